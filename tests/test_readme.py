"""The README documents every variable the code reads and every setting a partner declares."""

from __future__ import annotations

import re

from handlers import ALL_SETTINGS, VENDORS
from tests.support import ROOT

README = (ROOT / "README.md").read_text()


def test_every_segrelay_variable_in_the_code_is_documented() -> None:
    code = "\n".join(p.read_text() for p in (ROOT / "app").rglob("*.py"))
    names = set(re.findall(r"SEGRELAY_[A-Z_]+", code)) | {v.url_env for v in VENDORS}
    names -= {"SEGRELAY_"}
    missing = sorted(n for n in names if n not in README)
    assert not missing, f"README lacks {missing}"


def test_every_setting_is_in_the_developer_center_table() -> None:
    for setting in ALL_SETTINGS:
        assert f"| `{setting.name}` |" in README, setting.name


def test_readme_opens_with_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.+?)\n```", README, re.S)
    assert blocks[0] == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/segrelay serve"
    assert blocks[1] == "./scripts/test"
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()
