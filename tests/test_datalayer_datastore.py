"""Datastore: the weighted choice among model-rewrite targets."""

import random
from collections import Counter

import pytest

from epp.datalayer.datastore import Datastore
from tests.helpers import rewrite

DRAWS = 5000


def drawn(targets: list[tuple[str, int]], seed: int = 7) -> dict[str, float]:
    ds = Datastore()
    ds.set_rewrite(rewrite(["m"], *targets))
    rng = random.Random(seed)
    counts = Counter(ds.rewrite_model("m", rng) for _ in range(DRAWS))
    return {t: counts[t] / DRAWS for t, _ in targets}


@pytest.mark.parametrize("targets", [
    [("v2", 90), ("v1", 10)],
    [("v1", 10), ("v2", 90)],  # the heavy target last: an always-first choice fails here
    [("a", 60), ("b", 30), ("c", 10)],
    [("a", 1), ("b", 1)],
])
def test_draws_follow_the_weights(targets):
    total = sum(w for _, w in targets)
    shares = drawn(targets)
    for target, weight in targets:
        assert abs(shares[target] - weight / total) < 0.02, (target, shares)


def test_a_single_target_and_no_rule():
    ds = Datastore()
    ds.set_rewrite(rewrite(["m"], ("only", 5)))
    assert ds.rewrite_model("m", random.Random(1)) == "only" and ds.rewrite_model("other") is None
