"""Seedable benchmark workloads, described in YAML.

A workload is a list of `WorkItem`s (OpenAI chat requests plus the bookkeeping a
benchmark needs: which prefix group, session and turn a request belongs to). The same
items drive the real-stack load generator and the virtual-time cluster simulation, so
both see exactly the same prompts.

    workload:
      type: shared_prefix        # shared_prefix | multi_turn | lora_mix | random | long_prompt | slo_mix
      num_groups: 8              # shape of inference-perf's shared_prefix
      num_prompts_per_group: 16
      system_prompt_len: 2000    # tokens (about 4 characters each)
      question_len: 50
      output_len: 64
    num_requests: 400
    seed: 1
    model: meta-llama/Llama-3.1-8B-Instruct
    load: {type: poisson, rate: 20}   # or {type: concurrency, concurrency: 8}

Lengths are in tokens of the simulator's tokenizer (about 4 characters per token);
text is built from a fixed word list so it tokenizes like English.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml

from epp.requestcontrol.headers import SLO_TPOT_MS, SLO_TTFT_MS

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"

_WORDS = (
    "the of and to in is was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much before go good new write our used me man too any "
    "day same right look think also around another came come work three word must because does part even "
    "place well such here take why things help put years different away again off went old number great "
    "tell men say small every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head above kind began "
    "almost live page got earth need far hand high year mother light parts country father let night following "
    "picture being study second eyes soon times story boys since white days ever paper hard near sentence "
    "better best across during today others however sure means knew itself together cluster server request "
    "model token cache prefix latency throughput gateway inference endpoint scheduler kernel memory batch"
).split()


class WorkloadError(ValueError):
    """A workload file is wrong; the message names the key."""


# --------------------------------------------------------------------------- specs
@dataclass(slots=True)
class SharedPrefix:
    num_groups: int = 8
    num_prompts_per_group: int = 16
    system_prompt_len: int = 2000
    question_len: int = 50
    output_len: int = 64


@dataclass(slots=True)
class MultiTurn:
    num_sessions: int = 16
    turns: int = 4
    system_prompt_len: int = 500
    user_len: int = 100
    output_len: int = 64
    think_time: float = 0.0  # seconds between a reply and the session's next turn


@dataclass(slots=True)
class LoraMix:
    # adapter name -> weight; "" (or the base model's name) means the base model
    adapters: dict[str, float] = field(default_factory=lambda: {"sql-lora": 1.0, "chat-lora": 1.0, "": 2.0})
    prompt_len: int = 200
    output_len: int = 32


@dataclass(slots=True)
class RandomLengths:
    min_prompt_len: int = 50
    max_prompt_len: int = 2000
    min_output_len: int = 16
    max_output_len: int = 256


@dataclass(slots=True)
class LongPrompts:
    """Long prompts and long outputs (the P/D workload): each prompt is one of num_groups
    shared system prompts (shared_prefix_len tokens) then its own user text, the total drawn
    uniformly from [min_prompt_len, max_prompt_len]; outputs from [min_output_len, max_output_len]."""

    num_groups: int = 8
    shared_prefix_len: int = 2000
    min_prompt_len: int = 4000
    max_prompt_len: int = 8000
    min_output_len: int = 300
    max_output_len: int = 1000


@dataclass(slots=True)
class SloMix:
    """Short chat and long-document requests, each carrying its class's TTFT and TPOT SLOs
    as the reference's request headers (x-llm-d-slo-ttft-ms, x-llm-d-slo-tpot-ms). Chat
    prompts share one of num_chat_groups system prompts; documents share nothing. Group 0
    is chat, group 1 documents (for per-class figures)."""

    chat_fraction: float = 0.8
    num_chat_groups: int = 8
    chat_system_len: int = 400
    chat_min_question_len: int = 50
    chat_max_question_len: int = 400
    chat_min_output_len: int = 50
    chat_max_output_len: int = 250
    chat_ttft_slo_ms: float = 500.0
    chat_tpot_slo_ms: float = 30.0
    doc_min_prompt_len: int = 3000
    doc_max_prompt_len: int = 8000
    doc_min_output_len: int = 100
    doc_max_output_len: int = 400
    doc_ttft_slo_ms: float = 2500.0
    doc_tpot_slo_ms: float = 50.0


SPEC_TYPES: dict[str, type] = {
    "shared_prefix": SharedPrefix,
    "multi_turn": MultiTurn,
    "lora_mix": LoraMix,
    "random": RandomLengths,
    "long_prompt": LongPrompts,
    "slo_mix": SloMix,
}


@dataclass(slots=True)
class LoadSpec:
    type: str = "poisson"  # poisson (open loop) | concurrency (closed loop)
    rate: float = 10.0  # requests/s for poisson
    concurrency: int = 8  # in-flight requests for concurrency


@dataclass(slots=True)
class WorkloadSpec:
    type: str
    params: Any
    num_requests: int = 200
    seed: int = 1
    model: str = DEFAULT_MODEL
    load: LoadSpec = field(default_factory=LoadSpec)

    def replace(self, **changes: Any) -> WorkloadSpec:
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)
class WorkItem:
    """One request. `messages` is the OpenAI chat body; `prompt_len` is its token
    estimate (system + user parts, without the template)."""

    index: int
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    group: int = 0  # prefix-sharing group (shared_prefix), session (multi_turn), adapter index (lora_mix)
    session: int = -1  # >= 0: turns of one session are sent in order, each after the previous finished
    turn: int = 0
    think_time: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # request headers to send with it (e.g. SLOs)

    def body(self, stream: bool = True) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.model, "messages": self.messages, "max_tokens": self.max_tokens,
                             "ignore_eos": True, "temperature": 0}
        if stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        return b


# --------------------------------------------------------------------------- parsing
def _fields_from(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise WorkloadError(f"{where}.{key}: unknown key (known: {', '.join(known)})")
        default = getattr(cls(), key)
        value = _check_type(default, value, f"{where}.{key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise WorkloadError(f"{where}.{key}: must not be negative, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _check_type(default: Any, value: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise WorkloadError(f"{where}: expected a boolean, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise WorkloadError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise WorkloadError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise WorkloadError(f"{where}: expected a string, got {value!r}")
    elif isinstance(default, dict):
        if not isinstance(value, Mapping) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise WorkloadError(f"{where}: expected a mapping of name -> weight, got {value!r}")
        value = {str(k or ""): float(v) for k, v in value.items()}
    return value


def parse_workload(raw: Mapping[str, Any] | str) -> WorkloadSpec:
    """A WorkloadSpec from YAML text or an already-parsed mapping."""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) or {}
        except yaml.YAMLError as e:
            raise WorkloadError(f"workload file is not valid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise WorkloadError(f"workload file: expected a mapping, got {type(raw).__name__}")
    top = {"workload", "num_requests", "seed", "model", "load"}
    for key in raw:
        if key not in top:
            raise WorkloadError(f"{key}: unknown key (known: {', '.join(sorted(top))})")
    w = raw.get("workload") or {}
    if not isinstance(w, Mapping):
        raise WorkloadError("workload: expected a mapping")
    kind = w.get("type", "shared_prefix")
    if kind not in SPEC_TYPES:
        raise WorkloadError(f"workload.type: unknown workload {kind!r} (known: {', '.join(SPEC_TYPES)})")
    params = _fields_from(SPEC_TYPES[kind], {k: v for k, v in w.items() if k != "type"}, "workload")
    load_raw = raw.get("load") or {}
    if not isinstance(load_raw, Mapping):
        raise WorkloadError("load: expected a mapping")
    load = _fields_from(LoadSpec, load_raw, "load")
    if load.type not in ("poisson", "concurrency"):
        raise WorkloadError(f"load.type: expected poisson or concurrency, got {load.type!r}")
    spec = WorkloadSpec(type=kind, params=params, load=load)
    for key, typ in (("num_requests", int), ("seed", int), ("model", str)):
        if key in raw:
            value = raw[key]
            if not isinstance(value, typ) or isinstance(value, bool):
                raise WorkloadError(f"{key}: expected {typ.__name__}, got {value!r}")
            setattr(spec, key, value)
    if spec.num_requests <= 0:
        raise WorkloadError(f"num_requests: must be positive, got {spec.num_requests}")
    return spec


def load_workload_file(path: str) -> WorkloadSpec:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise WorkloadError(f"cannot read workload file {path}: {e}") from None
    return parse_workload(text)


# --------------------------------------------------------------------------- text
@lru_cache(maxsize=1)
def _word_costs() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tokens per word (first word, then with a leading space) in the simulator's tokenizer."""
    from simulator.tokenizer import encode

    return tuple(len(encode(w)) for w in _WORDS), tuple(len(encode(" " + w)) for w in _WORDS)


def make_text(rng: random.Random, tokens: int) -> str:
    """Exactly `tokens` tokens of English-like text for the simulator's tokenizer."""
    first, spaced = _word_costs()
    parts: list[str] = []
    count = 0
    words = _WORDS
    n = len(words)
    while count < tokens:
        k = int(rng.random() * n)
        cost = spaced[k] if parts else first[k]
        w = words[k]
        if count + cost > tokens:
            w, cost = "the", 1
        parts.append(w)
        count += cost
    return " ".join(parts)


# --------------------------------------------------------------------------- generators
def generate(spec: WorkloadSpec) -> list[WorkItem]:
    """The workload's requests, in send order; the same seed gives the same items."""
    rng = random.Random(spec.seed)
    p = spec.params
    if isinstance(p, SharedPrefix):
        return _shared_prefix(spec, p, rng)
    if isinstance(p, MultiTurn):
        return _multi_turn(spec, p, rng)
    if isinstance(p, LoraMix):
        return _lora_mix(spec, p, rng)
    if isinstance(p, RandomLengths):
        return _random_lengths(spec, p, rng)
    if isinstance(p, LongPrompts):
        return _long_prompts(spec, p, rng)
    if isinstance(p, SloMix):
        return _slo_mix(spec, p, rng)
    raise WorkloadError(f"workload.type: unknown workload {spec.type!r}")


def _shared_prefix(spec: WorkloadSpec, p: SharedPrefix, rng: random.Random) -> list[WorkItem]:
    # Like inference-perf: each group has one system prompt and its own questions;
    # requests draw (group, question) pairs uniformly at random.
    systems = [f"Group {g} instructions. " + make_text(rng, p.system_prompt_len) for g in range(p.num_groups)]
    questions = [[make_text(rng, p.question_len) for _ in range(p.num_prompts_per_group)]
                 for _ in range(p.num_groups)]
    items = []
    for i in range(spec.num_requests):
        g = rng.randrange(p.num_groups)
        q = rng.randrange(p.num_prompts_per_group)
        messages = [{"role": "system", "content": systems[g]}, {"role": "user", "content": questions[g][q]}]
        items.append(WorkItem(i, spec.model, messages, p.output_len, group=g))
    return items


def _multi_turn(spec: WorkloadSpec, p: MultiTurn, rng: random.Random) -> list[WorkItem]:
    # Sessions interleave; each turn's history holds every earlier turn (with a
    # canned assistant reply, so the workload does not depend on the server's output).
    sessions = []
    for s in range(p.num_sessions):
        system = f"Session {s}. " + make_text(rng, p.system_prompt_len)
        history: list[dict[str, str]] = [{"role": "system", "content": system}]
        turns = []
        for _ in range(p.turns):
            history = [*history, {"role": "user", "content": make_text(rng, p.user_len)}]
            turns.append(list(history))
            history = [*history, {"role": "assistant", "content": make_text(rng, p.output_len)}]
        sessions.append(turns)
    next_turn = [0] * p.num_sessions
    items: list[WorkItem] = []
    live = list(range(p.num_sessions))
    while len(items) < spec.num_requests and live:
        s = live[rng.randrange(len(live))]
        t = next_turn[s]
        items.append(WorkItem(len(items), spec.model, sessions[s][t], p.output_len, group=s, session=s, turn=t,
                              think_time=p.think_time))
        next_turn[s] += 1
        if next_turn[s] >= p.turns:
            live.remove(s)
    return items


def _lora_mix(spec: WorkloadSpec, p: LoraMix, rng: random.Random) -> list[WorkItem]:
    names = list(p.adapters)
    weights = [p.adapters[n] for n in names]
    if not names or sum(weights) <= 0:
        raise WorkloadError("workload.adapters: needs at least one adapter with a positive weight")
    items = []
    for i in range(spec.num_requests):
        k = rng.choices(range(len(names)), weights)[0]
        model = names[k] or spec.model
        messages = [{"role": "user", "content": make_text(rng, p.prompt_len)}]
        items.append(WorkItem(i, model, messages, p.output_len, group=k))
    return items


def _random_lengths(spec: WorkloadSpec, p: RandomLengths, rng: random.Random) -> list[WorkItem]:
    if p.min_prompt_len > p.max_prompt_len:
        raise WorkloadError("workload.min_prompt_len: larger than max_prompt_len")
    if p.min_output_len > p.max_output_len:
        raise WorkloadError("workload.min_output_len: larger than max_output_len")
    items = []
    for i in range(spec.num_requests):
        n_in = rng.randint(p.min_prompt_len, p.max_prompt_len)
        n_out = rng.randint(max(1, p.min_output_len), max(1, p.max_output_len))
        items.append(WorkItem(i, spec.model, [{"role": "user", "content": make_text(rng, n_in)}], n_out))
    return items


def _long_prompts(spec: WorkloadSpec, p: LongPrompts, rng: random.Random) -> list[WorkItem]:
    if p.num_groups < 1:
        raise WorkloadError("workload.num_groups: must be at least 1")
    if not 0 <= p.shared_prefix_len < p.min_prompt_len <= p.max_prompt_len:
        raise WorkloadError("workload.shared_prefix_len: needs 0 <= shared_prefix_len < min_prompt_len <= max_prompt_len")
    if not 1 <= p.min_output_len <= p.max_output_len:
        raise WorkloadError("workload.min_output_len: needs 1 <= min_output_len <= max_output_len")
    systems = [f"Group {g} document. " + make_text(rng, p.shared_prefix_len) for g in range(p.num_groups)]
    items = []
    for i in range(spec.num_requests):
        g = rng.randrange(p.num_groups)
        n_in = rng.randint(p.min_prompt_len, p.max_prompt_len)
        n_out = rng.randint(p.min_output_len, p.max_output_len)
        messages = [{"role": "system", "content": systems[g]},
                    {"role": "user", "content": make_text(rng, n_in - p.shared_prefix_len)}]
        items.append(WorkItem(i, spec.model, messages, n_out, group=g))
    return items


def slo_headers(ttft_ms: float, tpot_ms: float) -> dict[str, str]:
    return {SLO_TTFT_MS: f"{ttft_ms:g}", SLO_TPOT_MS: f"{tpot_ms:g}"}


def _slo_mix(spec: WorkloadSpec, p: SloMix, rng: random.Random) -> list[WorkItem]:
    if not 0.0 <= p.chat_fraction <= 1.0:
        raise WorkloadError("workload.chat_fraction: must be within 0..1")
    for lo, hi in (("chat_min_question_len", "chat_max_question_len"), ("chat_min_output_len", "chat_max_output_len"),
                   ("doc_min_prompt_len", "doc_max_prompt_len"), ("doc_min_output_len", "doc_max_output_len")):
        if not 1 <= getattr(p, lo) <= getattr(p, hi):
            raise WorkloadError(f"workload.{lo}: needs 1 <= {lo} <= {hi}")
    if p.num_chat_groups < 1:
        raise WorkloadError("workload.num_chat_groups: must be at least 1")
    systems = [f"Assistant {g}. " + make_text(rng, p.chat_system_len) for g in range(p.num_chat_groups)]
    chat_slo = slo_headers(p.chat_ttft_slo_ms, p.chat_tpot_slo_ms)
    doc_slo = slo_headers(p.doc_ttft_slo_ms, p.doc_tpot_slo_ms)
    items = []
    for i in range(spec.num_requests):
        if rng.random() < p.chat_fraction:
            messages = [{"role": "system", "content": systems[rng.randrange(p.num_chat_groups)]},
                        {"role": "user", "content": make_text(rng, rng.randint(p.chat_min_question_len,
                                                                               p.chat_max_question_len))}]
            n_out, group, slo = rng.randint(p.chat_min_output_len, p.chat_max_output_len), 0, chat_slo
        else:
            messages = [{"role": "user", "content": f"Document {i}. "
                         + make_text(rng, rng.randint(p.doc_min_prompt_len, p.doc_max_prompt_len))}]
            n_out, group, slo = rng.randint(p.doc_min_output_len, p.doc_max_output_len), 1, doc_slo
        items.append(WorkItem(i, spec.model, messages, n_out, group=group, headers=dict(slo)))
    return items


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Open-loop Poisson arrivals: n offsets (seconds from start) at `rate` per second."""
    if rate <= 0:
        raise WorkloadError(f"load.rate: must be positive, got {rate}")
    rng = random.Random(seed ^ 0x5EED)
    t = 0.0
    out = []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
