"""disaggregatedset-rollout-screener against the reference (llm-d-router pkg/epp/framework/plugins/
requestcontrol/screener/disaggregatedsetrollout: config.go defaults and checks, plugin.go's shares,
screener.go's weighted pick and strict header) and the Screener extension point as its director
runs it (runScreeners: intersection, none left = 503 "screeners eliminated all endpoint candidates")."""

from __future__ import annotations

import random

import pytest

from epp.assembly import load_plugin_set
from epp.errors import InferenceError
from epp.framework import InferenceRequest, PluginHandle, ResponseInfo
from epp.requestcontrol.rollout import MAX_ROLE, SUM, pick_revision, revision_shares
from tests.helpers import ep, plugin, plugin_set_error

REV, ROLE, SET = "disaggregatedset.x-k8s.io/revision", "disaggregatedset.x-k8s.io/role", "disaggregatedset.x-k8s.io/name"


def pod(i, rev, role, name="my-set"):
    return ep(i, {REV: rev, ROLE: role, SET: name})


def req(headers=None):
    return InferenceRequest("r", "m", "m", "completions", "x", dict(headers or {}))


def screener(mode="max-role", roles=("prefill", "decode"), **gating):
    return plugin("disaggregatedset-rollout-screener", {
        "scope": {"labelSelector": f"{SET}=my-set"},
        "revisionGating": {"mode": mode, **({"requiredRoles": list(roles)} if roles else {}), **gating}})


def test_readme_example_shares_max_role_and_sum():
    # 2P:10D mid-rollout: A = 2 prefill + 9 decode, B = 1 + 1
    counts = {"A": {"prefill": 2, "decode": 9}, "B": {"prefill": 1, "decode": 1}}
    assert revision_shares(counts, ["prefill", "decode"], MAX_ROLE) == {"A": 0.9, "B": 0.1}
    assert revision_shares(counts, ["prefill", "decode"], SUM) == pytest.approx({"A": 11 / 13, "B": 2 / 13})
    # a revision missing a required role has no share; a tie goes to the first listed role
    assert revision_shares({"A": {"decode": 3}, "B": {"prefill": 1, "decode": 1}}, ["prefill", "decode"],
                           MAX_ROLE) == {"B": 1.0}
    assert revision_shares({"A": {"prefill": 3, "decode": 1}, "B": {"prefill": 1, "decode": 3}},
                           ["prefill", "decode"], MAX_ROLE) == {"A": 0.75, "B": 0.25}
    assert revision_shares({}, ["prefill"], SUM) == {}


def test_weighted_pick_walks_revisions_in_name_order():
    shares = {"b": 0.25, "a": 0.75}
    assert pick_revision(shares, 0.0) == "a" and pick_revision(shares, 0.74) == "a"
    assert pick_revision(shares, 0.75) == "b" and pick_revision(shares, 0.999) == "b"
    assert pick_revision({}, 0.5) == ""


def test_screen_keeps_one_covered_revision_and_the_header_is_strict():
    s = screener()
    a = [pod(1, "A", "prefill"), pod(2, "A", "decode")]
    b_incomplete = [pod(3, "B", "decode")]
    other_set = [pod(4, "C", "prefill", name="other"), pod(5, "C", "decode", name="other")]
    pool = a + b_incomplete + other_set
    for i in range(20):  # only A is covered (C is outside the scope): every request lands on A
        assert s.screen(req({"x-request-id": f"r{i}"}), pool) == a
    assert s.shares == {"A": 1.0} and set(s.role_counts) == {"A", "B"}
    assert s.screen(req({"x-llm-d-disagg-revision": "B"}), pool) == []  # strict: never crosses revisions
    assert s.no_match == 1


def test_draws_follow_the_shares_and_a_decision_id_keeps_its_revision():
    s = screener()
    pool = [pod(1, "A", "prefill"), pod(2, "A", "decode"), pod(3, "A", "decode"), pod(4, "A", "decode"),
            pod(5, "B", "prefill"), pod(6, "B", "decode")]  # max-role: decode 3 vs 1
    picks = [s.screen(req(), pool)[0].labels[REV] for _ in range(2000)]
    assert 0.70 < picks.count("A") / len(picks) < 0.80
    first = s.screen(req({"x-llm-d-revision-decision-id": "d1"}), pool)[0].labels[REV]
    assert all(s.screen(req({"x-llm-d-revision-decision-id": "d1"}), pool)[0].labels[REV] == first
               for _ in range(50))


def test_fails_closed_without_a_covered_revision_and_disabled_mode_only_filters_the_header():
    assert screener().screen(req(), [pod(1, "A", "decode")]) == []
    s = screener("disabled", roles=())
    pool = [pod(1, "A", "decode"), pod(2, "B", "decode")]
    assert s.screen(req(), pool) == pool
    assert s.screen(req({"x-llm-d-disagg-revision": "B"}), pool) == [pool[1]]


def test_response_header_stamps_the_served_revision():
    s = screener(revisionHeaderName="X-Rev")
    info = ResponseInfo()
    s.response_received(req(), info, pod(1, "A", "decode"))
    assert info.set_headers == {"x-rev": "A"}


@pytest.mark.parametrize("params, message", [
    ({"revisionGating": {"mode": "sum", "requiredRoles": ["decode"]}}, "scope.labelSelector: is required"),
    ({"scope": {"labelSelector": "a=b"}}, "revisionGating: is required"),
    ({"scope": {"labelSelector": "a=b"}, "revisionGating": {"mode": "max-role"}},
     "requiredRoles: must contain at least one role when mode=max-role"),
    ({"scope": {"labelSelector": "a=b"}, "revisionGating": {"mode": "sum", "requiredRoles": ["d", "d"]}},
     "requiredRoles: contains a duplicate role"),
    ({"scope": {"labelSelector": "a=b"}, "revisionGating": {"mode": "weighted"}},
     "mode: 'weighted' must be one of sum|max-role|disabled"),
    ({"scope": {"labelSelector": "a=b"}, "revisionGating": {"mode": "sum", "requireRoles": {"values": ["d"]}}},
     "requireRoles: unknown parameter"),  # the older form is refused, as the reference's strict decoder does
])
def test_parameter_errors(params, message):
    text = f"plugins: [{{type: disaggregatedset-rollout-screener, parameters: {params}}}]"
    assert message in plugin_set_error(text.replace("'", '"'))


CONFIG = f"""
plugins:
- type: disaggregatedset-rollout-screener
  parameters:
    scope: {{labelSelector: "{SET}=my-set"}}
    revisionGating: {{mode: sum, requiredRoles: [decode]}}
- type: queue-scorer
schedulingProfiles: [{{name: default, plugins: [{{pluginRef: queue-scorer}}]}}]
"""


def test_the_plugin_set_runs_screeners_before_scheduling():
    ps = load_plugin_set(CONFIG, PluginHandle(rng=random.Random(1)))
    pool = [pod(1, "A", "decode"), pod(2, "B", "prefill")]
    _, result = ps.run_cycle(req(), pool)
    assert result.targets == [pool[0]]
    with pytest.raises(InferenceError) as e:
        ps.run_cycle(req(), [pod(2, "B", "prefill")])
    assert e.value.code == "ServiceUnavailable" and e.value.message == "screeners eliminated all endpoint candidates"


def test_explain_gives_the_verdict_without_storing_a_decision_or_counting_a_no_match():
    ps = load_plugin_set(CONFIG, PluginHandle(rng=random.Random(1)))
    s = ps.plugins["disaggregatedset-rollout-screener"]
    pool = [pod(1, "A", "decode"), pod(2, "B", "decode")]
    decided = req({"x-llm-d-revision-decision-id": "d1"})
    _, preview = ps.run_cycle(decided, pool, commit=False)
    with pytest.raises(InferenceError):
        ps.run_cycle(req({"x-llm-d-disagg-revision": "C"}), pool, commit=False)
    assert s.no_match == 0 and not s._decisions
    _, served = ps.run_cycle(decided, pool)
    assert dict(s._decisions) == {"d1": served.targets[0].labels[REV]} and preview.targets


def test_the_wide_ep_guide_config_needs_the_experimental_flag_as_in_the_reference():
    from pathlib import Path

    from epp.config import ConfigError

    text = (Path(__file__).parent / "fixtures" / "reference" / "configs" / "llm-d-wide-ep-lws.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        load_plugin_set(text, allow_experimental_plugins=False)
    assert "plugin 'disaggregatedset-rollout-screener' (type: 'disaggregatedset-rollout-screener') has Alpha " \
           "stability level, but command line flag --allow-experimental-plugins is not set" in str(e.value)
    ps = load_plugin_set(text, allow_experimental_plugins=True)
    assert ps.plugins["disaggregatedset-rollout-screener"].gating.requiredRoles == ["prefill", "decode"]
