"""Process-wide pieces of serve's children (app/process.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.support import ROOT

CHILD = "from app.process import die_with_parent; die_with_parent({parent}); print('alive', flush=True)"


def run_child(parent: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD.format(parent=parent)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_a_child_whose_parent_died_before_it_could_ask_ends_itself() -> None:
    """serve killed while a child it just started was still importing: the kernel will never send that child the
    parent-death signal, so it must notice (its parent is no longer the pid it was given) and end itself."""
    orphaned = run_child(parent="999999999")  # not its parent: as if serve were already gone
    assert orphaned.returncode == -signal.SIGKILL and "alive" not in orphaned.stdout


def test_a_child_of_a_living_parent_runs_on() -> None:
    assert run_child(parent=str(os.getpid())).stdout == "alive\n"
    assert run_child(parent="None").stdout == "alive\n"  # `segrelay deliver` run by hand: no parent to follow
