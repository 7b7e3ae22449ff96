"""ChannelBook: which LISTEN/UNLISTEN batch comes next (no server needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pglisten_fast._channels import Batch, ChannelBook


def test_wanted_channels_are_listened_in_one_batch() -> None:
    book = ChannelBook()
    book.want(["a", "b"])
    batch = book.next_batch()
    assert batch == Batch(listen=("a", "b"))
    assert book.inflight == batch
    assert not book.in_effect("a")
    assert book.confirm() == batch
    assert book.confirmed == {"a", "b"}
    assert book.in_effect("a")
    assert book.next_batch() is None


def test_shared_channel_is_unlistened_when_the_last_subscription_leaves() -> None:
    book = ChannelBook()
    book.want(["a"])
    book.want(["a"])
    assert book.wanted("a") == 2
    book.next_batch()
    book.confirm()
    book.unwant(["a"])
    assert book.next_batch() is None
    book.unwant(["a"])
    assert book.wanted("a") == 0
    assert book.next_batch() == Batch(unlisten=("a",))
    assert not book.in_effect("a"), "an UNLISTEN on its way"
    book.confirm()
    assert book.confirmed == frozenset()


def test_one_batch_in_flight_at_a_time() -> None:
    book = ChannelBook()
    book.want(["a"])
    book.next_batch()
    book.want(["b"])
    with pytest.raises(RuntimeError):
        book.next_batch()
    book.confirm()
    assert book.next_batch() == Batch(listen=("b",))
    with pytest.raises(RuntimeError):
        ChannelBook().confirm()


def test_a_refused_batch_is_retried_one_channel_at_a_time() -> None:
    book = ChannelBook()
    book.want(["ok1", "bad", "ok2"])
    book.next_batch()
    assert book.refuse() is None        # several channels: retry one by one
    seen = []
    refused = []
    while (batch := book.next_batch()) is not None:
        assert len(batch.listen) == 1 and not batch.unlisten
        seen.append(batch.listen[0])
        if batch.listen[0] == "bad":
            refused.append(book.refuse())
            book.unwant(["bad"])        # its subscriptions are closed
        else:
            book.confirm()
    assert sorted(seen) == ["bad", "ok1", "ok2"]
    assert refused == ["bad"]
    assert book.confirmed == {"ok1", "ok2"}


def test_reset_forgets_the_server_side_but_not_the_wishes() -> None:
    book = ChannelBook()
    book.want(["a", "b"])
    book.next_batch()
    book.confirm()
    book.want(["c"])
    book.next_batch()
    book.reset()                        # connection lost mid-flight
    assert book.inflight is None
    assert book.confirmed == frozenset()
    assert book.next_batch() == Batch(listen=("a", "b", "c"))


@given(st.lists(st.tuples(st.sampled_from(["want", "unwant", "sync", "reset"]),
                          st.sampled_from(["a", "b", "c"])), max_size=60))
def test_model_after_sync_the_server_has_exactly_the_wanted_channels(
    ops: list[tuple[str, str]],
) -> None:
    book = ChannelBook()
    model: dict[str, int] = {}
    for op, ch in ops:
        if op == "want":
            book.want([ch])
            model[ch] = model.get(ch, 0) + 1
        elif op == "unwant" and model.get(ch):
            book.unwant([ch])
            model[ch] -= 1
        elif op == "sync" and book.next_batch() is not None:
            book.confirm()
        elif op == "reset":
            book.reset()
    while book.next_batch() is not None:
        book.confirm()
    assert book.confirmed == {ch for ch, n in model.items() if n > 0}
