"""Request ids and stored ids: the caller's request id when safe to log, else new ids that never repeat."""

from __future__ import annotations

import re

from app.endpoint import request_id_of
from app.ids import new_id


def test_a_safe_incoming_id_is_kept_and_an_unsafe_one_replaced() -> None:
    assert request_id_of({b"x-request-id": b"abc-123"}) == "abc-123"
    replaced = request_id_of({b"x-request-id": b"a b\r\nInjected: yes"})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_new_ids_are_32_hex_digits_and_all_different() -> None:
    ids = [request_id_of({}) for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)
    assert len(set(ids)) == len(ids)
    assert len({rid[:16] for rid in ids}) == 1  # this process's half; the count makes each one new


def test_ids_for_stored_events_and_jobs_never_repeat_in_a_process() -> None:
    ids = [new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)
