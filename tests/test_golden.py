"""Every fixture x every vendor gives exactly the checked-in request (or skip, or contract error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handlers import VENDORS
from tests.golden import expected_path, fixtures, golden


@pytest.mark.parametrize("fixture", fixtures(), ids=lambda p: p.stem)
def test_fixture_translates_to_the_expected_requests(fixture: Path) -> None:
    results = golden(fixture)
    assert set(results) == {v.slug for v in VENDORS}
    for vendor, result in results.items():
        path = expected_path(vendor, fixture)
        assert path.exists(), f"missing {path}: run python -m tests.golden --write and review it"
        assert result == json.loads(path.read_text()), f"{vendor} x {fixture.name} differs from {path}"


def test_every_fixture_reaches_at_least_one_vendor_or_a_contract_error() -> None:
    for fixture in fixtures():
        results = golden(fixture).values()
        assert any(r.get("send") or r.get("status") or r.get("skipped") for r in results)
