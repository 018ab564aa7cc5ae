"""epp.backoff.Backoff: capped doubling, jitter bounds, reset (used by the Kubernetes
reflectors and the kv-events subscriptions)."""

from epp.backoff import Backoff


def test_exact_delays_double_up_to_the_cap_and_reset_starts_again():
    b = Backoff(0.1, 0.5, jitter=0.0)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next() == 0.1


def test_jitter_spreads_each_delay_within_its_fraction():
    b = Backoff(1.0, 4.0)  # the reflectors' default spread: +-20 %
    for expected in (1.0, 2.0, 4.0, 4.0):
        assert 0.8 * expected <= b.next() <= 1.2 * expected
