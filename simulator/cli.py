"""`epp sim`: N simulated vLLM servers on ports P..P+N-1, from one process and one asyncio loop.

    epp sim --port 8000 --model meta-llama/Llama-3.1-8B-Instruct --replicas 4 \\
        --pod-names a,b,c,d --labels tier=gold --replica-labels 0:zone=x --lora-modules sql,chat

Each server prints one line `sim ready: pod=... url=http://host:port ...` once listening.
With --kv-events-endpoint tcp://*:5557, replica i publishes on port 5557+i.

A mixed pool from one process (one value: every replica; else one per replica):
    epp sim --replicas 3 --roles prefill,decode,decode --hardware h100,a100,a100
An explicit --role/--roles labels each replica llm-d.ai/role=<role>; --hardware labels it
llm-d.ai/accelerator-vendor, llm-d.ai/accelerator-variant and nvidia.com/gpu.product, and
sets its timings (explicit timing flags still win)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys

from .data_parallel import wire
from .engine import EngineConfig
from .hardware import HARDWARE, engine_config
from .server import FAILURES, ROLE_LABEL, ROLES, SimConfig, SimServer
from .tokenizer import prompt_tokenizer


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _labels(value: str) -> dict[str, str]:
    out = {}
    for item in _csv(value):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"label {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="epp sim", description="vLLM-compatible simulated model servers")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="port of the first replica")
    p.add_argument("--model", default=SimConfig.model, help="served model name")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--pod-names", type=_csv, default=None,
                   help="comma-separated pod names, one per replica (default <pod-prefix>-<i>)")
    p.add_argument("--pod-prefix", default="sim")
    p.add_argument("--labels", type=_labels, default={}, help="k=v,... labels of every replica")
    p.add_argument("--replica-labels", action="append", default=[],
                   help="I:k=v,... labels of replica I (repeatable)")
    p.add_argument("--lora-modules", type=_csv, default=[], help="comma-separated LoRA adapters to preload")
    p.add_argument("--max-loras", type=int, default=d.max_loras)
    p.add_argument("--lora-load-time", type=float, default=d.lora_load_time, help="seconds to load an adapter")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--num-gpu-blocks", "--kv-cache-size", type=int, default=None,
                   help=f"KV cache blocks (default: the hardware's, else {d.num_gpu_blocks})")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--step-overhead", type=float, default=None,
                   help=f"seconds per engine step (default: the hardware's, else {d.step_overhead})")
    p.add_argument("--prefill-time-per-token", type=float, default=None,
                   help=f"default: the hardware's, else {d.prefill_time_per_token}")
    p.add_argument("--decode-time-per-seq", type=float, default=None,
                   help=f"default: the hardware's, else {d.decode_time_per_seq}")
    p.add_argument("--hardware", type=_csv, default=None,
                   help="hardware class(es), one or one per replica: " + ",".join(HARDWARE))
    p.add_argument("--role", "--roles", dest="roles", type=_csv, default=None,
                   help="P/D role(s), one or one per replica: prefill, decode, both (default) or encode")
    p.add_argument("--kv-transfer-bandwidth", type=float, default=None,
                   help=f"bytes/s of prompt KV pulled from a prefiller (default: the hardware's, "
                        f"else {d.kv_transfer_bandwidth:.0f})")
    p.add_argument("--kv-hold-time", type=float, default=d.kv_hold_time,
                   help="simulated seconds a prefill keeps its blocks for a decoder that never reads them")
    p.add_argument("--prefill-timeout", type=float, default=SimConfig.prefill_timeout,
                   help="wall seconds a decode server waits for its prefiller before prefilling locally")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds per wall second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("random", "echo"), default="random")
    p.add_argument("--failure-injection-rate", type=float, default=0.0, help="fraction of requests failed")
    p.add_argument("--failure-types", type=_csv, default=list(FAILURES),
                   help="comma-separated subset of " + ",".join(FAILURES))
    p.add_argument("--startup-delay", type=float, default=0.0, help="wall seconds /health answers 503")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="ranks per data-parallel pod: each group of this many consecutive replicas is one pod "
                        "whose first port serves x-data-parallel-host-port as the routing sidecar does")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenize prompts with this model directory's tokenizer.json and chat template "
                        "(default: the built-in Llama-3-style tokenizer)")
    p.add_argument("--kv-events-endpoint", default=None,
                   help="ZMQ PUB bind address, e.g. tcp://*:5557 (replica i binds port+i)")
    p.add_argument("--advertise-host", default=os.environ.get("POD_IP"),
                   help="host in the KV-events topic kv@<host>:<port>@<model> (default $POD_IP, else --host)")
    p.add_argument("--kv-events-connect", action="store_true",
                   help="connect the PUB socket to --kv-events-endpoint (a picker's global socket, as vLLM does for "
                        "a non-wildcard address) instead of binding it; every replica connects to the same address (a comma "
                        "list: to each, e.g. one global socket per picker replica)")
    p.add_argument("--kv-events-replay-endpoint", default=None,
                   help="bind vLLM's replay ROUTER socket here, e.g. tcp://*:5558 (replica i binds port+i)")
    return p


def _replica_endpoint(endpoint: str | None, i: int) -> str | None:
    if not endpoint or i == 0:
        return endpoint
    m = re.match(r"^(.*):(\d+)$", endpoint)
    if not m:
        raise ValueError(f"--kv-events-endpoint {endpoint!r} needs a port to give each replica its own")
    return f"{m.group(1)}:{int(m.group(2)) + i}"


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    if args.time_scale <= 0:
        raise ValueError("--time-scale must be > 0")
    if args.startup_delay < 0:
        raise ValueError("--startup-delay must be >= 0")
    if args.data_parallel_size < 1 or args.replicas % args.data_parallel_size:
        raise ValueError(f"--data-parallel-size must be >= 1 and divide --replicas ({args.replicas}), "
                         f"got {args.data_parallel_size}")
    if args.tokenizer:  # loaded (once, shared by the servers) to refuse a bad directory before any starts
        prompt_tokenizer(args.tokenizer)
    names = args.pod_names or [f"{args.pod_prefix}-{i}" for i in range(args.replicas)]
    if len(names) != args.replicas:
        raise ValueError(f"--pod-names has {len(names)} names for {args.replicas} replicas")
    per_replica: dict[int, dict[str, str]] = {}
    for spec in args.replica_labels:
        idx, _, rest = spec.partition(":")
        if not idx.isdigit() or int(idx) >= args.replicas:
            raise ValueError(f"--replica-labels {spec!r}: expected I:k=v with 0 <= I < {args.replicas}")
        per_replica.setdefault(int(idx), {}).update(_labels(rest))
    roles = _per_replica(args.roles, args.replicas, "--role")
    hardware = _per_replica(args.hardware, args.replicas, "--hardware")
    for r in roles or ():
        if r not in ROLES:
            raise ValueError(f"--role {r!r}: expected one of {', '.join(ROLES)}")
    for h in hardware or ():
        if h not in HARDWARE:
            raise ValueError(f"--hardware {h!r}: expected one of {', '.join(HARDWARE)}")
    engines = [engine_config(
        hardware[i] if hardware else None,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks=args.num_gpu_blocks, block_size=args.block_size, max_model_len=args.max_model_len,
        max_loras=args.max_loras, lora_load_time=args.lora_load_time, step_overhead=args.step_overhead,
        prefill_time_per_token=args.prefill_time_per_token, decode_time_per_seq=args.decode_time_per_seq,
        kv_transfer_bandwidth=args.kv_transfer_bandwidth, kv_hold_time=args.kv_hold_time)
        for i in range(args.replicas)]

    def labels(i: int) -> dict[str, str]:
        out: dict[str, str] = {}
        if roles:
            out[ROLE_LABEL] = roles[i]
        if hardware:
            out.update(HARDWARE[hardware[i]].labels())
        return {**out, **args.labels, **per_replica.get(i, {})}

    return [SimConfig(
        model=args.model, host=args.host, port=args.port + i, pod=names[i],
        labels=labels(i), engine=engines[i], role=roles[i] if roles else "both",
        hardware=hardware[i] if hardware else None, prefill_timeout=args.prefill_timeout,
        lora_modules=list(args.lora_modules), time_scale=args.time_scale, seed=args.seed + i, mode=args.mode,
        failure_injection_rate=args.failure_injection_rate, failure_types=list(args.failure_types),
        startup_delay=args.startup_delay,
        kv_events_endpoint=args.kv_events_endpoint if args.kv_events_connect else
        _replica_endpoint(args.kv_events_endpoint, i), kv_events_connect=args.kv_events_connect,
        kv_events_replay_endpoint=_replica_endpoint(args.kv_events_replay_endpoint, i),
        advertise_host=args.advertise_host, tokenizer=args.tokenizer,
    ) for i in range(args.replicas)]


def _per_replica(values: list[str] | None, n: int, flag: str) -> list[str] | None:
    if not values:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag} has {len(values)} values for {n} replicas (give 1 or {n})")
    return values


async def serve(configs: list[SimConfig], data_parallel_size: int = 1) -> None:
    """Run every server until SIGTERM/SIGINT, or until all have died (POST /sim/die)."""
    servers = [SimServer(c) for c in configs]
    wire(servers, data_parallel_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from .clock import AsyncioClock
    clock = AsyncioClock(loop, configs[0].time_scale)
    started = []
    try:
        for s in servers:
            started.append(s)  # stopped below even when its start fails half way (e.g. its port in use)
            await s.start(clock)
        waits = [asyncio.ensure_future(stop.wait())] + [asyncio.ensure_future(s.dead.wait()) for s in servers]
        all_dead = asyncio.ensure_future(asyncio.wait(waits[1:]))
        await asyncio.wait([waits[0], all_dead], return_when=asyncio.FIRST_COMPLETED)
        for w in [*waits, all_dead]:
            w.cancel()
        await asyncio.gather(*waits, all_dead, return_exceptions=True)
    finally:
        for s in started:
            await s.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
    except ValueError as e:
        print(f"epp sim: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(configs, args.data_parallel_size))
    except OSError as e:  # e.g. port in use
        print(f"epp sim: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
