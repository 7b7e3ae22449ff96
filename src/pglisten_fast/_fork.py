"""Fork detection: objects inherited by a child process refuse to be used.

A child made by ``os.fork()`` inherits a copy of every Listener and
Subscription, but not their threads, and shares their file descriptors
(the server connection, the wake-up fds) with the parent.  Using them in
the child would steal the parent's wake-ups or write into its session, so
every inherited object raises :class:`~pglisten_fast.Error` instead.

Objects record the fork generation they were created in; a counter bumped
in the child after each fork makes the check one attribute comparison.
"""

from __future__ import annotations

import os

from .errors import Error

__all__ = ["check", "generation"]

_generation = 0


def _after_fork_in_child() -> None:
    global _generation  # noqa: PLW0603 - bumped once per fork, in the child
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def generation() -> int:
    """The current process's fork generation."""
    return _generation


def check(created_in: int, what: str) -> None:
    """Raise :class:`Error` if the object was created before a fork.

    :raises Error: this process is a child forked after ``what`` was made.
    """
    if created_in != _generation:
        raise Error(
            f"this {what} was inherited through os.fork() and cannot be used "
            "in the child process (its connection and threads belong to the "
            "parent); create a new Listener in the child"
        )
