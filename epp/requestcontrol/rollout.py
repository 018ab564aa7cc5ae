"""disaggregatedset-rollout-screener (reference pkg/epp/framework/plugins/requestcontrol/
screener/disaggregatedsetrollout): keeps prefill and decode of one request on the same
DisaggregatedSet revision during a rollout.

A Screener runs once per request, before the producers and every scheduling profile, so
no later filter, scorer or picker can pair endpoints of two revisions. With gating on
(`sum` or `max-role`) a revision takes traffic only while every required role has a
ready pod; one revision is drawn per request, weighted by its pods (`sum`: its pods of
the required roles; `max-role`: its pods of the role with the most pods over all covered
revisions, ties to the first listed). A request carrying the revision header is held to
that revision strictly; the served endpoint's revision is stamped on the response.

The reference counts ready pods from its own Pod watch of the scope; here the pool's
endpoints stand for them (the datastore holds ready pods only), one pod per pod name, so
the plugin also works with static endpoints. Until a covered revision exists every
request is refused (503), as the reference fails closed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.framework import ConfiguredPlugin, Endpoint, InferenceRequest, PluginHandle, ResponseInfo
from epp.framework.headers import REQUEST_ID
from epp.labelselector import LabelSelector

DEFAULT_REVISION_HEADER = "x-llm-d-disagg-revision"
DEFAULT_REVISION_LABEL = "disaggregatedset.x-k8s.io/revision"
DEFAULT_ROLE_LABEL = "disaggregatedset.x-k8s.io/role"
DECISION_ID_HEADER = "x-llm-d-revision-decision-id"  # parallel sub-requests of one user request share it
SUM, MAX_ROLE, DISABLED = "sum", "max-role", "disabled"
MAX_DECISIONS = 10_000  # decision id -> revision, least recently used dropped (the reference: 5 min staleness)
MAX_REVISIONS = 64  # revisions with a share series; beyond that the gauge keeps the first ones


@dataclass(slots=True)
class Scope:
    labelSelector: str = ""


@dataclass(slots=True)
class RevisionGating:
    mode: str = ""
    requiredRoles: list[str] = field(default_factory=list)
    revisionHeaderName: str = ""
    revisionLabelKey: str = ""
    roleLabelKey: str = ""

    def validate(self) -> None:
        if self.mode not in (SUM, MAX_ROLE, DISABLED):
            raise ValueError(f"mode: {self.mode!r} must be one of sum|max-role|disabled")
        self.revisionHeaderName = (self.revisionHeaderName or DEFAULT_REVISION_HEADER).lower()
        self.revisionLabelKey = self.revisionLabelKey or DEFAULT_REVISION_LABEL
        self.roleLabelKey = self.roleLabelKey or DEFAULT_ROLE_LABEL
        if self.mode == DISABLED:
            return
        if not self.requiredRoles:
            raise ValueError(f"requiredRoles: must contain at least one role when mode={self.mode}")
        for i, role in enumerate(self.requiredRoles):
            if not role:
                raise ValueError(f"requiredRoles[{i}]: must not be empty")
        if len(set(self.requiredRoles)) != len(self.requiredRoles):
            raise ValueError("requiredRoles: contains a duplicate role")

    @property
    def active(self) -> bool:
        return self.mode in (SUM, MAX_ROLE) and bool(self.requiredRoles)


@dataclass(slots=True)
class RolloutScreenerParams:
    scope: Scope | None = None
    revisionGating: RevisionGating | None = None

    def validate(self) -> None:
        if self.scope is None or not self.scope.labelSelector:
            raise ValueError("scope.labelSelector: is required")
        try:
            LabelSelector.parse(self.scope.labelSelector)
        except ValueError as e:
            raise ValueError(f"scope.labelSelector: {e}") from None
        if self.revisionGating is None:
            raise ValueError("revisionGating: is required")


def revision_shares(role_counts: Mapping[str, Mapping[str, int]], required: Sequence[str],
                    mode: str) -> dict[str, float]:
    """Each covered revision's share of traffic (revision -> ready pods per role in)."""
    covered = {rev: roles for rev, roles in role_counts.items() if all(roles.get(r, 0) > 0 for r in required)}
    if mode == MAX_ROLE:
        dominant, most = "", -1
        for role in required:  # list order breaks a tie
            total = sum(roles.get(role, 0) for roles in covered.values())
            if total > most:
                dominant, most = role, total
        weights = {rev: roles.get(dominant, 0) for rev, roles in covered.items()}
    else:
        weights = {rev: sum(roles.get(r, 0) for r in required) for rev, roles in covered.items()}
    total = sum(weights.values())
    return {rev: w / total for rev, w in weights.items()} if total > 0 else {}


def pick_revision(shares: Mapping[str, float], draw: float) -> str:
    """The revision a draw in [0, 1) lands on, revisions in name order; '' when none."""
    total = sum(shares.values())
    if total == 0:
        return ""
    ordered = sorted(shares)
    x, cumulative = draw * total, 0.0
    for rev in ordered:
        cumulative += shares[rev]
        if x < cumulative:
            return rev
    return ordered[-1]


class _Metrics(Collector):
    """llm_d_epp_disaggregatedset_strict_revision_no_match_total and
    llm_d_epp_disaggregatedset_revision_gating_share of every screener instance."""

    def __init__(self) -> None:
        self.screeners: list[DisaggregatedSetRolloutScreener] = []

    def collect(self) -> Iterable[Metric]:
        no_match = CounterMetricFamily("llm_d_epp_disaggregatedset_strict_revision_no_match",
                                       "Strict revision selections that matched no endpoint and failed closed.",
                                       labels=["plugin_type", "plugin_name"])
        share = GaugeMetricFamily("llm_d_epp_disaggregatedset_revision_gating_share",
                                  "Current weighted revision gating share from 0 to 1; incomplete revisions have "
                                  "share 0.", labels=["plugin_type", "plugin_name", "mode", "revision"])
        for s in self.screeners:
            no_match.add_metric([s.type_name, s.name], s.no_match)
            for rev in list(s.role_counts)[:MAX_REVISIONS]:
                share.add_metric([s.type_name, s.name, s.gating.mode, rev], s.shares.get(rev, 0.0))
        return [no_match, share]




class DisaggregatedSetRolloutScreener(ConfiguredPlugin[RolloutScreenerParams]):
    """Screener + ResponseReceived (stamps the revision header)."""

    type_name = "disaggregatedset-rollout-screener"
    Params = RolloutScreenerParams

    def configure(self, p: RolloutScreenerParams, handle: PluginHandle) -> None:
        if p.scope is None or p.revisionGating is None:  # no parameters at all
            raise ValueError(f"{self.type_name} requires parameters (scope, revisionGating)")
        self.scope = LabelSelector.parse(p.scope.labelSelector)
        self.gating = p.revisionGating
        self.rng = handle.rng
        self.role_counts: dict[str, dict[str, int]] = {}
        self.shares: dict[str, float] = {}
        self._pool_labels: list[Mapping[str, str]] = [{}]  # never equal to a pool: the first call counts
        self._decisions: OrderedDict[str, str] = OrderedDict()
        self.no_match = 0
        handle.metrics.shared(_Metrics).screeners.append(self)

    # ------------------------------------------------------------------ the pods seen
    def observe(self, endpoints: Sequence[Endpoint]) -> None:
        """Recount ready pods per revision and role from the pool's endpoints (when they changed)."""
        seen = self._pool_labels  # the label mappings last counted (held, so identity is safe)
        if len(seen) == len(endpoints) and all(e.labels is m for e, m in zip(endpoints, seen, strict=True)):
            return
        self._pool_labels = [e.labels for e in endpoints]
        g = self.gating
        pods: dict[str, tuple[str, str]] = {}
        for e in endpoints:
            labels = e.labels
            rev, role = labels.get(g.revisionLabelKey, ""), labels.get(g.roleLabelKey, "")
            if rev and role and self.scope.matches(labels):
                pods[f"{e.namespace}/{e.pod_name}"] = (rev, role)
        counts: dict[str, dict[str, int]] = {}
        for rev, role in pods.values():
            per_role = counts.setdefault(rev, {})
            per_role[role] = per_role.get(role, 0) + 1
        self.role_counts = counts
        self.shares = revision_shares(counts, g.requiredRoles, g.mode)

    # ------------------------------------------------------------------ Screener
    def screen(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return self._screen(request, endpoints, record=True)

    def preview(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """The verdict explain shows: no decision stored, no no-match counted."""
        return self._screen(request, endpoints, record=False)

    def _screen(self, request: InferenceRequest, endpoints: Sequence[Endpoint], record: bool) -> Sequence[Endpoint]:
        g = self.gating
        requested = request.headers.get(g.revisionHeaderName, "")
        if not g.active:
            if not requested:
                return endpoints
            return self._kept(endpoints, None, requested, strict=True, record=record)
        self.observe(endpoints)
        label = g.revisionLabelKey
        allowed = {e.labels.get(label, "") for e in endpoints} & self.shares.keys()
        chosen = requested
        if not chosen:
            chosen = pick_revision({rev: self.shares[rev] for rev in allowed}, self.rng.random())
            decision = request.headers.get(DECISION_ID_HEADER) or request.headers.get(REQUEST_ID, "")
            if decision and chosen:
                chosen = self._decide(decision, chosen, record)
        return self._kept(endpoints, allowed, chosen, strict=bool(requested), record=record)

    def _decide(self, decision: str, candidate: str, record: bool) -> str:
        """The first revision chosen for a decision id wins (the reference's local GetOrSet)."""
        known = self._decisions.get(decision)
        if known is not None:
            if record:
                self._decisions.move_to_end(decision)
            return known
        if not record:
            return candidate
        self._decisions[decision] = candidate
        if len(self._decisions) > MAX_DECISIONS:
            self._decisions.popitem(last=False)
        return candidate

    def _kept(self, endpoints: Sequence[Endpoint], allowed: set[str] | None, chosen: str,
              strict: bool, record: bool) -> list[Endpoint]:
        label = self.gating.revisionLabelKey
        kept = [e for e in endpoints if (allowed is None or e.labels.get(label, "") in allowed)
                and (not chosen or e.labels.get(label, "") == chosen)]
        if not kept and strict and record:
            self.no_match += 1
        return kept

    # ------------------------------------------------------------------ ResponseReceived
    def response_received(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        if target is None:
            return
        revision = target.labels.get(self.gating.revisionLabelKey, "")
        if revision:
            response.set_headers[self.gating.revisionHeaderName] = revision
