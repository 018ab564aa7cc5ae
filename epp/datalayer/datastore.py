"""The picker's view of the pool: endpoints, objectives, model rewrites.

Written by background producers (discovery, scrapers); read by the hot path. Reads
are lock-free: `endpoints()` returns an immutable tuple that is swapped on change,
so a scheduling cycle never sees a half-applied update. Everything runs on one
asyncio loop, so writers need no lock either.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from epp.framework import Endpoint, Metrics
from epp.framework.types import ServedModels


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What discovery knows about an endpoint (no metrics, no counters)."""

    name: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "default"
    pod_name: str = ""


@dataclass(frozen=True, slots=True)
class Objective:
    """InferenceObjective: a name selected per request by header, with a priority."""

    name: str
    priority: int = 0
    namespace: str = "default"


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model_rewrite: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule of an InferenceModelRewrite. `matches` empty = matches every model."""

    matches: tuple[str, ...]  # exact model names
    targets: tuple[RewriteTarget, ...]


@dataclass(frozen=True, slots=True)
class ModelRewrite:
    """InferenceModelRewrite; precedence: exact match beats catch-all, then oldest
    creation_timestamp, then list order."""

    name: str
    rules: tuple[RewriteRule, ...]
    creation_timestamp: float = 0.0
    namespace: str = "default"


class Datastore:
    def __init__(self) -> None:
        self._by_name: dict[str, Endpoint] = {}
        self._by_hostport: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._removed_listeners: list[Callable[[Sequence[Endpoint]], None]] = []
        self._changed_listeners: list[Callable[[], None]] = []
        self.objectives: dict[str, Objective] = {}
        self._rewrites: dict[str, ModelRewrite] = {}
        self._rewrite_order: tuple[ModelRewrite, ...] = ()
        self.synced = False  # set by discovery after its first full sync

    # ------------------------------------------------------------------ endpoints
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def get(self, name: str) -> Endpoint | None:
        return self._by_name.get(name)

    def by_hostport(self, hostport: str) -> Endpoint | None:
        return self._by_hostport.get(hostport)

    def upsert(self, spec: EndpointSpec) -> Endpoint:
        """Add an endpoint or update its address/labels in place (keeping metrics and
        counters when the address is unchanged)."""
        ep = self._by_name.get(spec.name)
        if ep is not None and (ep.address, ep.port) == (spec.address, spec.port):
            if ep.labels != spec.labels:
                ep.labels = dict(spec.labels)
                self._publish()
            return ep
        if ep is not None:
            self.remove(spec.name)
        ep = Endpoint(
            name=spec.name,
            address=spec.address,
            port=spec.port,
            labels=dict(spec.labels),
            namespace=spec.namespace,
            pod_name=spec.pod_name or spec.name,
        )
        self._by_name[ep.name] = ep
        self._by_hostport[ep.hostport] = ep
        self._publish()
        return ep

    def remove(self, name: str) -> Endpoint | None:
        ep = self._by_name.pop(name, None)
        if ep is None:
            return None
        if self._by_hostport.get(ep.hostport) is ep:
            del self._by_hostport[ep.hostport]
        self._publish()
        for listener in self._removed_listeners:
            listener((ep,))
        return ep

    def replace_all(self, specs: Iterable[EndpointSpec]) -> None:
        """Make the endpoint set exactly `specs` (a full re-list)."""
        specs = list(specs)
        wanted = {s.name for s in specs}
        for name in [n for n in self._by_name if n not in wanted]:
            self.remove(name)
        for spec in specs:
            self.upsert(spec)

    def set_metrics(self, endpoint: Endpoint, metrics: Metrics) -> None:
        endpoint.metrics = metrics

    def set_served(self, endpoint: Endpoint, served: ServedModels) -> None:
        endpoint.served = served

    def on_endpoints_removed(self, listener: Callable[[Sequence[Endpoint]], None]) -> None:
        self._removed_listeners.append(listener)

    def on_endpoints_changed(self, listener: Callable[[], None]) -> None:
        """Called after any add/remove/relabel (e.g. to start or stop scrapers)."""
        self._changed_listeners.append(listener)

    def _publish(self) -> None:
        self._snapshot = tuple(sorted(self._by_name.values(), key=lambda e: e.name))
        for listener in self._changed_listeners:
            listener()

    # ------------------------------------------------------------------ objectives and rewrites
    def set_objective(self, objective: Objective) -> None:
        self.objectives[objective.name] = objective

    def remove_objective(self, name: str) -> None:
        self.objectives.pop(name, None)

    def set_rewrite(self, rewrite: ModelRewrite) -> None:
        self._rewrites[rewrite.name] = rewrite
        self._order_rewrites()

    def remove_rewrite(self, name: str) -> None:
        if self._rewrites.pop(name, None) is not None:
            self._order_rewrites()

    def replace_rewrites(self, rewrites: Iterable[ModelRewrite]) -> None:
        self._rewrites = {r.name: r for r in rewrites}
        self._order_rewrites()

    def replace_objectives(self, objectives: Iterable[Objective]) -> None:
        self.objectives = {o.name: o for o in objectives}

    def _order_rewrites(self) -> None:
        # Stable sort keeps list (insertion) order among equal timestamps.
        self._rewrite_order = tuple(sorted(self._rewrites.values(), key=lambda r: r.creation_timestamp))

    def rewrites(self) -> tuple[ModelRewrite, ...]:
        return self._rewrite_order

    def rewrite_model(self, model: str, rng: random.Random | None = None) -> str | None:
        """Target model for `model` per the InferenceModelRewrite precedence rules, or
        None when no rule applies. Weighted random choice among the rule's targets."""
        choice = self.rewrite_choice(model, rng)
        return choice[1] if choice is not None else None

    def rewrite_choice(self, model: str, rng: random.Random | None = None) -> tuple[str, str] | None:
        """(name of the InferenceModelRewrite whose rule applies, target model), or None:
        rewrite_model with the rule's owner, for the model_rewrite_name metric label."""
        exact: tuple[str, RewriteRule] | None = None
        catch_all: tuple[str, RewriteRule] | None = None
        for rw in self._rewrite_order:
            for rule in rw.rules:
                if not rule.matches:
                    if catch_all is None:
                        catch_all = (rw.name, rule)
                elif model in rule.matches and exact is None:
                    exact = (rw.name, rule)
            if exact is not None:
                break
        found = exact or catch_all
        if found is None or not found[1].targets:
            return None
        name, rule = found
        return name, self._pick_target(rule, rng)

    @staticmethod
    def _pick_target(rule: RewriteRule, rng: random.Random | None) -> str:
        targets = rule.targets
        if len(targets) == 1:
            return targets[0].model_rewrite
        r = (rng or random).random() * sum(t.weight for t in targets)
        for t in targets:
            r -= t.weight
            if r < 0:
                return t.model_rewrite
        return targets[-1].model_rewrite
