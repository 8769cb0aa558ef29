"""Golden requests: every fixture in fixtures/segment x every vendor -> fixtures/expected/<vendor>/<name>.json.

Regenerating is deliberate: `python -m tests.golden --write`, then review the diff.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.config import vendor_urls
from app.errors import ContractError
from app.event import parse_event
from app.outgoing import render
from app.settings import resolve
from app.translate import active_vendors, translate
from handlers import BY_SLUG, VENDORS
from tests.support import ALL_VENDORS, FIXTURES

EXPECTED = FIXTURES / "expected"
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)  # only used by events that carry no timestamp at all


def golden(fixture: Path) -> dict[str, dict[str, Any]]:
    """What each vendor receives for one fixture, with the vendors' real base URLs (never contacted)."""
    raw = fixture.read_bytes()
    settings = resolve(ALL_VENDORS)
    urls = vendor_urls({})
    try:
        event = parse_event(json.loads(raw), raw, NOW, settings.get("defaultCurrency"))
    except ContractError as exc:
        return {v.slug: {"status": exc.status_code, "message": exc.message} for v in VENDORS}
    translation = translate(event, settings, active_vendors(settings))
    return {
        v.slug: {
            "send": [_versionless(render(BY_SLUG[p.vendor], [p], urls[p.vendor]).describe(p.vendor))
                     for p in translation.postbacks if p.vendor == v.slug],
            "skipped": [s.reason for s in translation.skips if s.vendor == v.slug],
        }
        for v in VENDORS
    }


def _versionless(request: dict[str, Any]) -> dict[str, Any]:
    """The User-Agent names the running version: the golden files name none, so a release does not change them."""
    headers = request.get("headers", {})
    if "user-agent" in headers:
        headers["user-agent"] = headers["user-agent"].split("/")[0] + "/<version>"
    return request


def expected_path(vendor: str, fixture: Path) -> Path:
    return EXPECTED / vendor / fixture.name


def fixtures() -> list[Path]:
    return sorted((FIXTURES / "segment").glob("*.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="overwrite the expected files")
    args = parser.parse_args()
    changed = 0
    for fixture in fixtures():
        for vendor, result in golden(fixture).items():
            path = expected_path(vendor, fixture)
            text = json.dumps(result, indent=2, sort_keys=True) + "\n"
            if not path.exists() or path.read_text() != text:
                changed += 1
                print(f"{'writing' if args.write else 'differs'}: {path.relative_to(FIXTURES.parent.parent)}")
                if args.write:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
    print(f"{changed} file(s) {'written' if args.write else 'differ'}")


if __name__ == "__main__":
    main()
