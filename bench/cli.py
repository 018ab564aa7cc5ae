"""`epp bench <routing|cluster|pd|goodput|precise|precise-stack|agree|soak|sim|scheduler|scrape|picker> [flags]`.

routing   one workload and rate sweep through the real Envoy per routing strategy
cluster   the virtual-time cluster simulation (engine model + the picker's real scheduler)
pd        aggregated vs prefill/decode disaggregation in the cluster simulation (long prompts and outputs)
goodput   SLO attainment and goodput on mixed and uniform pools in the cluster simulation (bench.goodput)
precise   random vs approximate vs precise (KV-event) prefix-cache routing in the cluster simulation (bench.precise)
precise-stack  the same through the real stack on 4-8 servers, reduced scale (bench.precise_stack)
agree     the real stack and the cluster simulation agree within 15%
soak      mixed and hostile requests through the real stack per ext_proc transport; nothing left in flight
sim, scheduler, scrape, picker: the component cost benchmarks (bench.<name>_cost)

Results (markdown with the exact command and machine, and PNG plots) go to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import sys
from pathlib import Path

from bench.report import (
    RESULTS_DIR,
    SUMMARY_HEADERS,
    Row,
    command_line,
    ms,
    num,
    numeric_flags,
    pct,
    plot_latency_vs_rate,
    plot_pd,
    plot_per_server,
    plot_ttft_cdf,
    publish,
    summary_rows,
    table,
)
from bench.workloads import (
    DEFAULT_MODEL,
    LoadSpec,
    SharedPrefix,
    WorkloadError,
    WorkloadSpec,
    load_workload_file,
)

PASS_THROUGH = {"sim": "bench.sim_cost", "scheduler": "bench.scheduler_cost", "scrape": "bench.scrape_cost",
                "picker": "bench.picker_cost", "soak": "bench.soak", "goodput": "bench.goodput",
                "precise": "bench.precise", "precise-stack": "bench.precise_stack"}


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _workload_args(ap: argparse.ArgumentParser, *, groups: int, system: int, output: int, requests: int,
                   prompts_per_group: int = 16) -> None:
    g = ap.add_argument_group("workload (ignored parts come from --workload FILE when given)")
    g.add_argument("--workload", help="workload YAML file (bench.workloads)")
    g.add_argument("--requests", type=int, default=None, help=f"requests per run (default {requests})")
    g.add_argument("--groups", type=int, default=groups, help="shared-prefix groups (default workload)")
    g.add_argument("--prompts-per-group", type=int, default=prompts_per_group)
    g.add_argument("--system-prompt-len", type=int, default=system)
    g.add_argument("--question-len", type=int, default=50)
    g.add_argument("--output-len", type=int, default=output)
    g.add_argument("--concurrency", type=int, default=0, help="closed loop at this concurrency instead of Poisson")
    g.add_argument("--seed", type=int, default=1)
    ap.set_defaults(_requests_default=requests)


def _workload(a: argparse.Namespace) -> WorkloadSpec:
    if a.workload:
        spec = load_workload_file(a.workload)
        if a.requests:
            spec.num_requests = a.requests
    else:
        spec = WorkloadSpec("shared_prefix", SharedPrefix(a.groups, a.prompts_per_group, a.system_prompt_len,
                                                          a.question_len, a.output_len),
                            num_requests=a.requests or a._requests_default, seed=a.seed, model=DEFAULT_MODEL)
    if a.concurrency:
        spec.load = LoadSpec(type="concurrency", concurrency=a.concurrency)
    return spec


def _results_args(ap: argparse.ArgumentParser, name: str, plots: bool = True) -> None:
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    ap.add_argument("--name", default=name, help="file name stem of the results")
    if plots:
        ap.add_argument("--no-plots", dest="plots", action="store_false")


def _parse(ap: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, WorkloadSpec]:
    """Flags and the workload they describe; a bad workload exits 2 naming the key."""
    a = ap.parse_args(argv)
    try:
        return a, _workload(a)
    except WorkloadError as e:
        ap.error(str(e))


def _describe(spec: WorkloadSpec) -> str:
    params = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(spec.params).items())
    load = (f"closed loop, concurrency {spec.load.concurrency}" if spec.load.type == "concurrency"
            else "open-loop Poisson arrivals")
    return f"workload: {spec.type} ({params}); {spec.num_requests} requests, seed {spec.seed}; {load}"


def _strategies(text: str, configs: list[str]) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    return out + [f"picker:{c}" for c in configs]


# --------------------------------------------------------------------------- cluster
def cmd_cluster(argv: list[str]) -> int:
    from bench.cluster import BASE_STRATEGIES, ClusterConfig, run_strategies, scaled
    from simulator.engine import EngineConfig

    ap = argparse.ArgumentParser(prog="epp bench cluster", description="virtual-time cluster simulation")
    ap.add_argument("--servers", type=int, default=8)
    ap.add_argument("--rates", type=_floats, default=[100.0, 150.0, 200.0, 250.0], help="requests/s, comma-separated")
    ap.add_argument("--strategies", default=",".join(BASE_STRATEGIES))
    ap.add_argument("--config", action="append", default=[], help="EndpointPickerConfig file (adds picker:<file>)")
    ap.add_argument("--num-gpu-blocks", type=int, default=EngineConfig.num_gpu_blocks)
    ap.add_argument("--roles", default="", help="one role per server (prefill, decode, both), comma-separated; "
                    "labelled llm-d.ai/role (use with a P/D --config)")
    ap.add_argument("--hardware", default="", help="one hardware class per server (h100, h200, a100, a100-40gb)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="report as a real-stack run at this `epp sim --time-scale` would see it: rates are per "
                         "wall second and times wall seconds (1 = the simulated H100's own time)")
    _results_args(ap, "cluster")
    _workload_args(ap, groups=64, system=2000, output=64, requests=2000)
    a, spec = _parse(ap, argv)
    strategies = _strategies(a.strategies, a.config)
    try:
        cfg = ClusterConfig(servers=a.servers, engine=EngineConfig(num_gpu_blocks=a.num_gpu_blocks), seed=a.seed,
                            model=spec.model, roles=tuple(x.strip() for x in a.roles.split(",") if x.strip()),
                            hardware=tuple(x.strip() for x in a.hardware.split(",") if x.strip()))
    except ValueError as e:
        ap.error(str(e))
    from bench.workloads import generate

    items = generate(spec)
    print(_describe(spec), flush=True)
    rows: list[Row] = []
    timing: list[list[str]] = []
    rates = [None] if spec.load.type == "concurrency" else a.rates
    for rate in rates:
        load = spec.load if rate is None else LoadSpec(type="poisson", rate=rate)
        try:
            results = run_strategies(strategies, items, load, cfg, time_scale=a.time_scale)
        except ValueError as e:
            print(f"epp bench cluster: {e}", file=sys.stderr)
            return 2
        for raw in results:
            r = scaled(raw, a.time_scale)
            rows.append(Row(r.strategy, rate, r.summary(), r.hit_rate, r.per_server, r.results))
            timing.append([r.strategy, "-" if rate is None else num(rate, 0), num(r.wall_seconds, 2),
                           num(r.routing_seconds, 2), num(raw.duration, 1)])
    text = table(SUMMARY_HEADERS, summary_rows(rows))
    print("\n" + text)
    print("\n" + table(["strategy", "rate/s", "wall s", "routing s", "simulated s"], timing))
    body = (f"{_describe(spec)}; {a.servers} simulated servers (H100, Llama-3.1-8B timing, "
            f"{a.num_gpu_blocks} KV blocks each).\n"
            + ("Times are virtual seconds.\n\n" if a.time_scale == 1 else
               f"Rates and times as a real-stack run at --time-scale {a.time_scale:g} sees them (wall seconds; "
               "simulated time = wall x time scale).\n\n")
            + table(SUMMARY_HEADERS, summary_rows(rows), markdown=True)
            + "\n\nWall time of each simulation:\n\n"
            + table(["strategy", "rate/s", "wall s", "routing s", "simulated s"], timing, markdown=True))

    def plots(stem: Path) -> list[Path]:
        top = [r for r in rows if r.rate == rates[-1]]
        paths = [Path(f"{stem}_ttft_cdf.png"), Path(f"{stem}_per_server.png")]
        plot_ttft_cdf(top, paths[0], f"TTFT at {rates[-1] or 'closed loop'} req/s")
        plot_per_server(top, paths[1], "Requests per server")
        if len(rates) > 1:
            paths.append(Path(f"{stem}_latency_vs_rate.png"))
            plot_latency_vs_rate(rows, paths[-1], f"Cluster simulation, {a.servers} servers")
        return paths

    publish(a, "Cluster simulation (virtual time)", command_line(["bench", "cluster", *argv]), body, plots)
    return 0


# --------------------------------------------------------------------------- pd
def cmd_pd(argv: list[str]) -> int:
    from bench.cluster import PD_CONFIG, ClusterConfig, pd_setups, simulate
    from bench.loadgen import Progress, percentile
    from bench.workloads import LongPrompts, WorkloadSpec, generate

    ap = argparse.ArgumentParser(prog="epp bench pd",
                                 description="aggregated vs P/D in the virtual-time cluster simulation")
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--splits", default="1:3,2:2", help="prefill:decode server splits, comma-separated")
    ap.add_argument("--rates", type=_floats, default=[4.0, 8.0, 12.0, 16.0, 20.0, 24.0],
                    help="requests/s, comma-separated")
    ap.add_argument("--pd-config", default=PD_CONFIG, help="EndpointPickerConfig of the P/D setups")
    ap.add_argument("--aggregated", default="picker", help="strategy of the aggregated setup (default config)")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--seed", type=int, default=1)
    numeric_flags(ap.add_argument_group("workload (long_prompt)"), **dataclasses.asdict(LongPrompts()))
    _results_args(ap, "pd")
    a = ap.parse_args(argv)
    try:
        params = LongPrompts(a.num_groups, a.shared_prefix_len, a.min_prompt_len, a.max_prompt_len,
                             a.min_output_len, a.max_output_len)
        spec = WorkloadSpec("long_prompt", params, num_requests=a.requests, seed=a.seed, model=DEFAULT_MODEL)
        items = generate(spec)
        setups = pd_setups(a.servers, [x.strip() for x in a.splits.split(",") if x.strip()], a.pd_config,
                           a.aggregated)
    except (ValueError, WorkloadError) as e:
        ap.error(str(e))
    print(_describe(spec), flush=True)
    rows: list[Row] = []
    detail: list[list[str]] = []
    itl99: dict[tuple[str, float], float] = {}
    for setup in setups:
        cfg = ClusterConfig(servers=a.servers, seed=a.seed, model=spec.model, roles=setup.roles, token_itl=True)
        for rate in a.rates:
            progress = Progress(f"{setup.name:<10} {num(rate, 0):>4} req/s", len(items))
            try:
                r = simulate(setup.strategy, items, LoadSpec(type="poisson", rate=rate), cfg, progress=progress)
            except ValueError as e:
                print(f"epp bench pd: {e}", file=sys.stderr)
                return 2
            s = r.summary()
            rows.append(Row(setup.name, rate, s, r.hit_rate, r.per_server, r.results))
            itl = [x for res in r.results if res.ok for x in res.itl]
            itl99[(setup.name, rate)] = percentile(itl, 99)
            work = " ".join("/".join(str(w[k]) for k in ("prefill", "decode", "both")) for w in r.pd.by_role)
            detail.append([setup.name, num(rate, 0), ms(s.ttft_p50), ms(s.ttft_p90), ms1(s.itl_p50), ms1(s.itl_p90),
                           ms1(itl99[(setup.name, rate)]), ms(s.e2e_p90), num(s.output_tokens_per_s, 0), str(s.errors),
                           str(r.pd.requests), str(r.pd.local_fallbacks), num(r.pd.kv_bytes / 1e9, 1), work])
    names = [s.name for s in setups]
    side_headers = ["rate/s"] + [f"{n} {m}" for m in ("TTFT p90 ms", "ITL p90 ms", "ITL p99 ms", "out tok/s")
                                 for n in names]
    by = {(r.strategy, r.rate): r.summary for r in rows}
    side = []
    for rate in a.rates:
        line = [num(rate, 0)]
        line += [ms(by[(n, rate)].ttft_p90) for n in names]
        line += [ms1(by[(n, rate)].itl_p90) for n in names]
        line += [ms1(itl99[(n, rate)]) for n in names]
        line += [num(by[(n, rate)].output_tokens_per_s, 0) for n in names]
        side.append(line)
    detail_headers = ["setup", "rate/s", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "ITL p90 ms", "ITL p99 ms",
                      "E2E p90 ms", "out tok/s", "errors", "P/D requests", "fallbacks", "KV GB",
                      "work per server (prefill/decode/both)"]
    verdict = pd_verdict(names, a.rates, by, itl99)
    print("\n" + table(side_headers, side))
    print("\n" + table(detail_headers, detail))
    print("\n" + verdict)
    body = (f"{_describe(spec)}; {a.servers} simulated servers (H100, Llama-3.1-8B timing). Aggregated: every "
            f"server role both, strategy {a.aggregated}. P/D: servers labelled llm-d.ai/role prefill or decode, "
            f"picker config {Path(a.pd_config).name}; a P/D request is prefilled on the prefill server "
            "(simulator.pd), its KV pulled over the decode server's link, decoded there; its TTFT includes all "
            "of that. ITL: every gap between consecutive tokens of every request. Times are virtual seconds.\n\n"
            + table(side_headers, side, markdown=True)
            + "\n\nDetail (work per server: requests served in each role, as the engines count them):\n\n"
            + table(detail_headers, detail, markdown=True) + f"\n\n{verdict}")

    def plots(stem: Path) -> list[Path]:
        png = Path(f"{stem}_latency_vs_rate.png")
        plot_pd(rows, png, f"Aggregated vs P/D, {a.servers} servers, long prompts and outputs")
        return [png]

    publish(a, "Aggregated vs P/D disaggregation (cluster simulation, virtual time)",
            command_line(["bench", "pd", *argv]), body, plots)
    return 0


def ms1(x: float) -> str:
    return num(x * 1000, 1)


def pd_verdict(names: list[str], rates: list[float], by: dict, itl99: dict) -> str:
    """Per P/D setup: at which rates it beats aggregated on TTFT p90, ITL p90/p99 and output tokens/s."""
    base = names[0]
    lines = []

    def value(name: str, rate: float, key: str) -> float:
        return itl99[(name, rate)] if key == "itl_p99" else getattr(by[(name, rate)], key)

    for n in names[1:]:
        parts = []
        for label, key, lower in (("TTFT p90", "ttft_p90", True), ("ITL p90", "itl_p90", True),
                                  ("ITL p99", "itl_p99", True), ("output tok/s", "output_tokens_per_s", False)):
            wins, losses = [], []
            for rate in rates:
                x, y = value(n, rate, key), value(base, rate, key)
                if abs(x - y) <= 0.05 * abs(y):
                    continue
                (wins if (x < y) == lower else losses).append(num(rate, 0))
            parts.append(f"{label} better at {', '.join(wins) or 'no rate'}, worse at {', '.join(losses) or 'no rate'}")
        lines.append(f"- {n} vs {base} (differences over 5%, rates in req/s): " + "; ".join(parts) + ".")
    return "\n".join(lines)


# --------------------------------------------------------------------------- routing
def cmd_routing(argv: list[str]) -> int:
    from bench.routing import run_routing
    from bench.strategies import ROUTING_STRATEGIES

    ap = argparse.ArgumentParser(prog="epp bench routing", description="routing strategies through the real Envoy")
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--rates", type=_floats, default=[4.0, 6.0], help="requests per wall second")
    ap.add_argument("--time-scale", type=float, default=0.1, help="simulator seconds per wall second")
    ap.add_argument("--strategies", default=",".join(ROUTING_STRATEGIES))
    ap.add_argument("--config", action="append", default=[], help="EndpointPickerConfig file (adds picker:<file>)")
    ap.add_argument("--sim-flags", type=shlex.split, default=[],
                    help="extra `epp sim` flags, e.g. '--lora-modules sql-lora,chat-lora --max-loras 2'")
    _results_args(ap, "routing")
    _workload_args(ap, groups=16, system=3000, output=24, requests=200, prompts_per_group=8)
    a, spec = _parse(ap, argv)
    strategies = _strategies(a.strategies, a.config)
    print(_describe(spec), flush=True)
    try:
        rows = run_routing(spec, strategies, a.rates, servers=a.servers, time_scale=a.time_scale,
                           sim_flags=a.sim_flags)
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"epp bench routing: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    text = table(SUMMARY_HEADERS, summary_rows(rows))
    print("\n" + text)
    body = (f"{_describe(spec)}; {a.servers} `epp sim` servers at --time-scale {a.time_scale:g} behind the real "
            f"Envoy; every run on fresh servers. Times are wall-clock.\n\n"
            + table(SUMMARY_HEADERS, summary_rows(rows), markdown=True))

    def plots(stem: Path) -> list[Path]:
        paths = [Path(f"{stem}_latency_vs_rate.png"), Path(f"{stem}_ttft_cdf.png")]
        plot_latency_vs_rate(rows, paths[0], "Real stack (Envoy + picker + epp sim)")
        plot_ttft_cdf([r for r in rows if r.rate == max(a.rates)], paths[1], f"TTFT at {max(a.rates):g} req/s")
        return paths

    publish(a, "Routing through the real stack", command_line(["bench", "routing", *argv]), body, plots)
    return 0


# --------------------------------------------------------------------------- agree
def cmd_agree(argv: list[str]) -> int:
    from bench.agree import EQUIVALENT, run_agree

    ap = argparse.ArgumentParser(prog="epp bench agree", description="real stack vs. cluster simulation")
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per wall second (Poisson)")
    ap.add_argument("--time-scale", type=float, default=0.1)
    ap.add_argument("--strategy", default="picker", choices=sorted(EQUIVALENT))
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--sim-flags", type=shlex.split, default=[], help="extra `epp sim` flags (timing flags would "
                    "make the two sides differ: the simulation uses the engine defaults)")
    _results_args(ap, "agree", plots=False)
    _workload_args(ap, groups=8, system=2000, output=32, requests=120, prompts_per_group=8)
    a, spec = _parse(ap, argv)
    if spec.load.type == "poisson":
        spec.load = LoadSpec(type="poisson", rate=a.rate)
    print(_describe(spec), flush=True)
    try:
        ag = run_agree(spec, servers=a.servers, time_scale=a.time_scale, strategy=a.strategy, tolerance=a.tolerance,
                       sim_flags=tuple(a.sim_flags))
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"epp bench agree: {e}", file=sys.stderr)
        return 1
    headers = ["", "real stack", "cluster simulation", "difference"]
    rows = [
        ["output tokens/s", num(ag.real.output_tokens_per_s, 1), num(ag.sim.output_tokens_per_s, 1),
         pct(ag.throughput_diff)],
        ["TTFT p50 (ms)", ms(ag.real.ttft_p50), ms(ag.sim.ttft_p50), pct(ag.ttft_diff)],
        ["TTFT p50 without gateway latency (ms)", "-", ms(ag.uncalibrated.ttft_p50),
         pct(ag.diff(ag.real.ttft_p50, ag.uncalibrated.ttft_p50))],
        ["TTFT p90 (ms)", ms(ag.real.ttft_p90), ms(ag.sim.ttft_p90), "-"],
        ["ITL p50 (ms)", ms(ag.real.itl_p50), ms(ag.sim.itl_p50), "-"],
        ["hit rate", pct(ag.real_hit_rate), pct(ag.sim_hit_rate), "-"],
        ["errors", str(ag.real.errors), str(ag.sim.errors), "-"],
    ]
    verdict = (f"gateway latency measured on the same stack: {ag.gateway_latency * 1000:.1f} ms per request "
               f"(wall)\n{'AGREE' if ag.ok else 'DISAGREE'}: throughput and median TTFT within "
               f"{ag.tolerance:.0%}" + ("" if ag.ok else " failed"))
    print("\n" + table(headers, rows) + "\n\n" + verdict)
    body = (f"{_describe(spec)}; strategy {a.strategy}; {a.servers} servers; real stack at --time-scale "
            f"{a.time_scale:g} (wall seconds); the simulation's virtual seconds divided by the time scale.\n\n"
            + table(headers, rows, markdown=True) + f"\n\n{verdict}")
    publish(a, "Agreement: real stack vs. cluster simulation", command_line(["bench", "agree", *argv]), body)
    return 0 if ag.ok else 1


COMMANDS = {"routing": cmd_routing, "cluster": cmd_cluster, "pd": cmd_pd, "agree": cmd_agree}


def usage() -> str:
    return __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return COMMANDS[command](rest)
    if command in PASS_THROUGH:
        return int(importlib.import_module(PASS_THROUGH[command]).main(rest) or 0)
    print(f"epp bench: unknown benchmark {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
