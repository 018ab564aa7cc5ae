"""bench.kvindex_cost runs and prints the three figures the README quotes."""

from __future__ import annotations

import re

from bench import kvindex_cost


def test_kvindex_cost_prints_memory_intake_and_lookup_figures(capsys):
    kvindex_cost.main(["--blocks", "2000", "--rounds", "1"])
    out = capsys.readouterr().out
    memory = [float(m) for m in re.findall(r"memory:\s+([\d.]+) MiB per million blocks", out)]
    assert len(memory) == 2 and 0 < memory[0] < memory[1]  # a second holder costs more, not double
    assert float(re.search(r"intake:\s+([\d.]+) ms CPU per 1,000 events", out).group(1)) > 0
    lookups = re.findall(r"(\d+) tokens: cached prefix\s+([\d.]+) ms\s+uncached\s+([\d.]+) ms", out)
    assert [int(t) for t, _, _ in lookups] == [1024, 8192, 32768]
