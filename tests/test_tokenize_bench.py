"""bench.tokenize_cost runs and prints the rows the README quotes: tokenization alone, and
the hot path (token-producer + precise-prefix-cache-producer's PrepareData) for 1k, 8k and
32k-character prompts, cached and uncached prefix (the benchmark itself checks that the
cached prefix is matched and the uncached one is not)."""

from __future__ import annotations

import re

from bench import tokenize_cost

US = r"([\d.]+)us"


def test_tokenize_cost_prints_tokenization_and_hot_path_rows(capsys):
    assert tokenize_cost.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    tokenization, hot = out.split("hot path:")
    rows = re.findall(rf"(\w+)\s+(\d+) (\S+)\s+{US}\s+{US}\n", tokenization)
    assert [(b, int(c), p) for b, c, p, _, _ in rows] == [
        (b, c, p) for c in (1000, 8000, 32000)
        for b, p in (("inProcess", "uncached"), ("inProcess", "cached"), ("vllm", "uncached"), ("vllm", "cached"),
                     ("estimate", "-"))]
    rows = re.findall(rf"(\w+)\s+(\d+) (cached|uncached)\s+{US}\s+{US}\s+{US}\s+{US}", hot)
    assert [(b, int(c), p) for b, c, p, *_ in rows] == [
        (b, c, p) for c in (1000, 8000, 32000) for b in ("inProcess", "vllm") for p in ("cached", "uncached")]
    for *_, total, tokenize, waited, lookup in rows:
        total, tokenize, waited, lookup = map(float, (total, tokenize, waited, lookup))
        assert lookup > 0 and tokenize >= waited > 0
        assert abs(total - (tokenize + lookup)) <= 0.2  # one round: the total is the sum of its parts
