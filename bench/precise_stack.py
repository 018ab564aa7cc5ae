"""Random vs approximate vs precise prefix-cache routing through the real stack, reduced scale.

Fresh `epp sim` servers for every run (cold caches), the real Envoy, and for the picker
strategies the real picker (`epp serve`):
  random       Envoy's RANDOM load balancer (no picker)
  approximate  the picker with bench.precise.APPROX_CONFIG (approx-prefix-cache-producer)
  precise      (and precise-nospec: speculativeIndexing off, the reference's default)
               the picker with token-producer (in process, the tokenizer fixture the
               servers use too) and precise-prefix-cache-producer, whose global socket
               (kvEventsConfig.zmqEndpoint) the servers' KV-event publishers connect to, as
               in the reference's kind configuration; endpoints reach it through
               endpoint-notification-source.
The servers tokenize with tests/fixtures/tokenizer, so token ids, block keys and the KV
events meet; their KV memory (--num-gpu-blocks) is sized so that the workload's distinct
system prompts take `--fill` of the pool. Optionally, servers reset their prefix cache in
turn during the run (POST /reset_prefix_cache: AllBlocksCleared), the restart stress.
With --replicas N, N pickers sit behind Envoy's ext_proc cluster (round robin per request,
as several EPP pods behind one Service): each approximate replica learns only from its own
share of the decisions, while every precise replica binds its own global socket and each
server's publisher connects to all of them, so every replica's index sees every event. The
figures go into a section of the same markdown file, after the one-replica table.

`python -m bench.precise_stack` (or `epp bench precise-stack`) prints a table and writes
bench/results/precise-stack.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.loadgen import Progress, run_load
from bench.precise import APPROX_CONFIG, common_args, precise_config, rates_and_strategies, report
from bench.report import Row, command_line, write_markdown
from bench.workloads import DEFAULT_MODEL, LoadSpec, SharedPrefix, WorkItem, WorkloadSpec, generate
from devstack.launch import envoy_binary, free_ports
from devstack.localstack import LocalStack, hit_rate, local_stack

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"
BLOCK_SIZE = 16


def stack_config(zmq_endpoint: str, speculative: bool = True) -> str:
    """precise_config with the in-process token-producer, the global KV-event socket and the
    endpoint notifications that name the publishers."""
    text = precise_config(BLOCK_SIZE, 2.0 if speculative else None).replace(
        "    speculativeTTL: 2s\n",
        f"    speculativeTTL: 2s\n    kvEventsConfig:\n      zmqEndpoint: {zmq_endpoint}\n      discoverPods: false\n", 1)
    text = text.replace("plugins:\n", f"plugins:\n- type: token-producer\n  parameters:\n    inProcess:\n"
                                      f"      path: {TOKENIZER}\n- type: endpoint-notification-source\n", 1)
    return text + ("dataLayer:\n  sources:\n  - pluginRef: endpoint-notification-source\n    extractors:\n"
                   "    - pluginRef: precise-prefix-cache-producer\n")


@contextlib.contextmanager
def strategy_stack(strategy: str, n: int, gpu_blocks: int, time_scale: float, replicas: int = 1,
                   log_dir: Path | None = None) -> Iterator[LocalStack]:
    flags = ["--tokenizer", str(TOKENIZER), "--num-gpu-blocks", str(gpu_blocks), "--block-size", str(BLOCK_SIZE)]
    kw: dict = {}
    if strategy == "random":
        kw["envoy_mode"] = "random"
    elif strategy == "approximate":
        kw["config_text"], kw["replicas"] = APPROX_CONFIG, replicas
    else:
        endpoints = [f"tcp://127.0.0.1:{p}" for p in free_ports(replicas)]  # one global socket per replica
        configs = [stack_config(e, strategy != "precise-nospec") for e in endpoints]
        kw["config_text"], kw["replicas"] = configs.__getitem__, replicas
        flags += ["--kv-events-endpoint", ",".join(endpoints), "--kv-events-connect"]
    with local_stack(n, model=DEFAULT_MODEL, time_scale=time_scale, sim_flags=flags, log_dir=log_dir, **kw) as st:
        yield st


def prefix_tokens(items: Sequence[WorkItem]) -> int:
    """Tokens of the distinct system prompts under the servers' tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    return sum(len(tok.encode(s).ids) for s in {it.messages[0]["content"] for it in items})


class Resetter:
    """POSTs /reset_prefix_cache to the servers in turn every `every` wall seconds (a server
    with requests running refuses; it is tried again at the next turn)."""

    def __init__(self, st: LocalStack, every: float) -> None:
        self.st, self.every = st, every
        self.done = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Resetter:
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        k = 0
        while not self._stop.wait(self.every):
            i = k % self.st.sims.n
            k += 1
            try:
                req = urllib.request.Request(self.st.sims.url(i) + "/reset_prefix_cache", method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            if ok:
                self.done += 1
            else:
                self.refused += 1


def write_section(path: Path, title: str, command: str, body: str) -> None:
    """Put `## title` (replacing an earlier run's) at the end of the markdown file at `path`."""
    head = f"\n## {title}\n"
    text = path.read_text() if path.exists() else ""
    start = text.find(head)
    if start >= 0:  # drop the earlier run's section, up to the next one
        end = text.find("\n## ", start + len(head))
        text = text[:start] + (text[end:] if end >= 0 else "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text.rstrip()}\n{head}\nCommand: `{command}`\n\nDate: {when}\n\n{body}\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.precise_stack", description=__doc__.split("\n\n")[0])
    common_args(ap, rates="3,8", requests=200, prefix_len=1500, strategies="random,approximate,precise",
                out="bench/results/precise-stack")
    ap.add_argument("--groups", type=int, default=12, help="distinct system prompts")
    ap.add_argument("--time-scale", type=float, default=0.5, help="simulated seconds per wall second")
    ap.add_argument("--reset-every", type=float, default=0.0,
                    help="also run each strategy at the highest rate with a server cache reset every S wall seconds")
    ap.add_argument("--replicas", type=int, default=1,
                    help="picker replicas behind Envoy (2-4: a section of the output file, after the one-replica run)")
    a = ap.parse_args(argv)
    try:
        rates, strategies = rates_and_strategies(a.rates, a.strategies)
        if not 4 <= a.servers <= 8:
            raise ValueError("--servers: 4 to 8")
        if not 1 <= a.replicas <= 4:
            raise ValueError("--replicas: 1 to 4")
        envoy_binary()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = WorkloadSpec("shared_prefix", SharedPrefix(a.groups, 8, a.prefix_len, 40, 16), num_requests=a.requests,
                        seed=a.seed)
    items = generate(spec)
    used = prefix_tokens(items) // BLOCK_SIZE
    gpu_blocks = math.ceil(used / (a.fill * a.servers))
    print(f"{a.servers} servers x {gpu_blocks} blocks x {BLOCK_SIZE} tokens; {a.groups} system prompts take {used} "
          f"blocks = {used / (gpu_blocks * a.servers):.0%} of the pool's KV memory", flush=True)
    runs = [(r, 0.0) for r in rates] + ([(max(rates), a.reset_every)] if a.reset_every > 0 else [])
    rows: list[tuple[str, Row, object]] = []
    t0 = time.perf_counter()
    for rate, reset in runs:
        scen = "baseline" if not reset else f"cache reset every {reset:g}s"
        for s in strategies:
            with strategy_stack(s, a.servers, gpu_blocks, a.time_scale, a.replicas) as st, \
                    Resetter(st, reset) as rs:
                before = st.sims.counts()
                run = asyncio.run(run_load(st.url, items, LoadSpec(rate=rate), seed=a.seed,
                                           progress=Progress(f"{scen} {s} @{rate:g}/s", len(items))))
                served = [x - y for x, y in zip(st.sims.counts(), before, strict=True)]
            if reset:
                scen_row = f"{scen} ({rs.done} done)"
            rows.append((scen_row if reset else scen, Row(s, rate, run.summary(), hit_rate(served),
                                                          [c.requests for c in served], run.results), None))
    text = report(rows)
    wall = time.perf_counter() - t0
    print(text)
    cmd = command_line(["bench", "precise-stack", *(argv if argv is not None else sys.argv[1:])])
    out = Path(a.out).with_suffix(".md")
    setup = (f"{a.servers} simulator servers x {gpu_blocks} KV blocks of {BLOCK_SIZE} tokens; {a.groups} "
             f"system prompts take {used / (gpu_blocks * a.servers):.0%} of the pool's KV memory; "
             f"{a.requests} requests per run; time scale {a.time_scale:g} (latencies are wall-clock).")
    if a.replicas == 1:
        write_markdown(out, "Precise vs approximate prefix-cache routing (real stack, reduced scale)", cmd,
                       f"{setup}\n\n```\n{text}\n```", f"Wall time {wall:.0f} s.")
    else:
        write_section(out, f"{a.replicas} picker replicas", cmd,
                      f"{setup} {a.replicas} pickers behind Envoy's ext_proc cluster (round robin); random is "
                      f"Envoy's own balancer, no picker.\n\n```\n{text}\n```\n\nWall time {wall:.0f} s.")
    print(f"wrote {out} (wall {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
