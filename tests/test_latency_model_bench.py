"""bench.latency_model_cost prints every candidate's accuracy and costs side by side in one run."""

from __future__ import annotations

import re

from bench.latency_model_cost import CANDIDATES, VllmLaw, main, run


def test_one_run_prints_accuracy_and_costs_of_every_candidate(capsys):
    main(["--train", "400", "--seed", "3"])
    out = capsys.readouterr().out
    assert "noise floor MAPE TTFT 9.6%" in out
    for name in CANDIDATES:
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert re.search(r"\d+\.\d%\s+[\d.]+ms\s+\d+\.\d%\s+[\d.]+ms\s+[\d.]+ us\s+[\d.]+ ms\s+[\d.]+%/[\d.]+%$", row), row


def test_the_shipped_model_beats_the_reference_raw_columns():
    law = VllmLaw()
    knee, raw = run("ridge-knee", 2_000, 4, law), run("ridge-raw", 2_000, 4, law)
    assert knee.ttft_mape < 0.5 * raw.ttft_mape and knee.tpot_mape < raw.tpot_mape
    assert knee.predict_us > 0 and knee.train_ms_per_1k > 0
