"""`epp demo` leaves no process behind when interrupted with Ctrl-C (SIGINT)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.processes import interrupt_when

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_stops_every_process(tmp_path):
    # Mid-run: simulator servers, the picker and Envoy are all up and serving.
    out = interrupt_when([sys.executable, "-m", "epp.cli", "demo", "--servers", "2", "--requests", "500",
                          "--rate", "2", "--no-plots", "--out", str(tmp_path)],
                         "sending 500 requests", tmp_path / "demo.log", ROOT)
    assert "interrupted" in out
