"""The package's module boundaries: no import cycle, one home for the C boundary."""

from __future__ import annotations

import ast
from pathlib import Path

import pglisten_fast

PKG = Path(pglisten_fast.__file__).resolve().parent
NAME = "pglisten_fast"

#: The only modules that may import the cffi extension.
C_WRAPPERS = {"_ring", "_router", "_readpath"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [NAME, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Package-internal modules imported by ``path`` (TYPE_CHECKING ones too)."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(NAME))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(NAME):
                continue
            found.add(target)
            # "from . import x" imports the submodule x.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if _exists(candidate):
                    found.add(candidate)
    found.discard(module)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    """A module of the package: source, package or compiled extension."""
    rel = Path(*module.split(".")[1:])
    return (
        (PKG / rel).with_suffix(".py").exists()
        or (PKG / rel / "__init__.py").exists()
        or any(PKG.glob(f"{rel}.*.so"))
        or any(PKG.glob(f"{rel}.*.pyd"))
    )


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        module = _module_name(path)
        # A package's __init__ re-exports its submodules: importing a
        # submodule runs the package first, which is not a cycle of ours.
        graph[module] = {m for m in _imports(path, module)
                         if not module.startswith(m + ".")}
    return graph


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 10, graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_only_the_wrappers_import_the_cffi_extension() -> None:
    offenders = sorted(
        m for m, deps in _graph().items()
        if f"{NAME}._pglf" in deps and m.rpartition(".")[2] not in C_WRAPPERS
    )
    assert offenders == []
    # And each wrapper does use it (the list above is not stale).
    users = {m.rpartition(".")[2] for m, deps in _graph().items()
             if f"{NAME}._pglf" in deps}
    assert users == C_WRAPPERS


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    # The checker itself: a relative import resolves to the module it names.
    src = tmp_path / "x.py"
    src.write_text("from ._ring import Ring\nfrom . import _router\n")
    assert _imports(src, f"{NAME}.x") == {NAME, f"{NAME}._ring", f"{NAME}._router"}
