"""`make demo` plays the whole flow end to end and tells the story it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_the_whole_flow() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNS_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for marker in (
        "=== 1. Register the backup client ===",
        "joined; its key is pinned.",
        "Match code: ",
        "APPROVED on the phone. Login allowed.",
        "REJECTED on the phone. Login refused.",
        "One-time password accepted. Login allowed.",
    ):
        assert marker in out
    assert out.index("APPROVED") < out.index("REJECTED") < out.index("One-time password accepted")
