"""Counter additions of one event-loop turn are written together: the values are the same, the writes fewer."""

from __future__ import annotations

import asyncio

from app import metrics


async def test_counter_additions_of_one_turn_are_written_together_at_its_end() -> None:
    child = metrics.labelled(metrics.POSTBACKS, "audiohook", "queued")
    before = child._value.get()
    metrics.add(child, 2)
    metrics.add(child)
    assert child._value.get() == before  # not yet: the turn is not over
    await asyncio.sleep(0)
    assert child._value.get() == before + 3


async def test_the_exposition_includes_what_this_turn_added() -> None:
    child = metrics.labelled(metrics.SKIPS, "tracify", "no_page_url")
    before = child._value.get()
    metrics.add(child, 5)
    text = metrics.exposition().decode()
    assert f'segrelay_skips_total{{reason="no_page_url",vendor="tracify"}} {before + 5}' in text


def test_outside_an_event_loop_an_addition_is_written_at_once() -> None:
    child = metrics.labelled(metrics.POSTBACKS, "tracify", "dead")
    before = child._value.get()
    metrics.add(child, 4)
    assert child._value.get() == before + 4
