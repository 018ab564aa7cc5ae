"""Tables, plots and the machine description for benchmark results."""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import RequestResult, Summary, percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"nproc {os.cpu_count()}, CPU {cpu or 'unknown'}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def numeric_flags(ap: argparse._ActionsContainer, **defaults: float) -> None:
    """One `--a-name N` flag per keyword (a_name=default), typed as its default (int or float),
    on a parser or one of its argument groups."""
    for key, default in defaults.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=type(default), default=default)


def command_line(argv: Sequence[str] | None = None) -> str:
    return "epp " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1000:.0f}"


def num(x: float, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 100:.1f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


@dataclass(slots=True)
class Row:
    """One line of a comparison: a strategy (at a rate) and what it achieved."""

    strategy: str
    rate: float | None
    summary: Summary
    hit_rate: float
    per_server: list[float]
    results: list[RequestResult]


SUMMARY_HEADERS = ["strategy", "rate/s", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "E2E p90 ms", "output tok/s",
                   "req/s", "hit rate", "errors", "requests per server"]


def summary_rows(rows: Sequence[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        s = r.summary
        out.append([r.strategy, "-" if r.rate is None else num(r.rate, 1), ms(s.ttft_p50), ms(s.ttft_p90),
                    ms(s.itl_p50), ms(s.e2e_p90), num(s.output_tokens_per_s, 0), num(s.requests_per_s, 2),
                    pct(r.hit_rate), str(s.errors), " ".join(str(int(c)) for c in r.per_server)])
    return out


def write_markdown(path: Path, title: str, command: str, body: str, notes: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\nCommand: `{command}`\n\nMachine: {machine()}\n\n"
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{body}\n")
    if notes:
        text += f"\n{notes}\n"
    path.write_text(text)


def publish(a: argparse.Namespace, title: str, command: str, body: str,
            plots: Callable[[Path], Sequence[Path]] | None = None) -> None:
    """A benchmark's results: <a.out>/<a.name>.md, then, unless --no-plots, the PNG files
    `plots(<a.out>/<a.name>)` draws; each path printed."""
    md = a.out / f"{a.name}.md"
    write_markdown(md, title, command, body)
    print(f"\nresults: {md}")
    if plots is not None and a.plots:
        for png in plots(a.out / a.name):
            print(f"plot: {png}")


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, xlabel: str, ylabel: str, title: str, *, grid: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(True, alpha=0.3)
    ax.legend()


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_strategy_over_rate(rows: Sequence[Row]) -> list[tuple[str, list[Row], list[float | None]]]:
    """The rows grouped by strategy (first-seen order), each group sorted by offered rate:
    (strategy, rows, rates), one line of a rate plot each."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.strategy, []).append(r)
    out = []
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r.rate or 0)
        out.append((name, rs, [r.rate for r in rs]))
    return out


def _finish_rate_axes(plt, fig, axes, path: Path, title: str) -> None:
    """The offered rate on every x axis, a grid, the legend on the first panel; saved."""
    for ax in axes:
        ax.set_xlabel("offered rate (requests/s)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small", loc="upper left")
    fig.suptitle(title)
    _save(plt, fig, path)


def plot_ttft_cdf(rows: Sequence[Row], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        xs = sorted(x.ttft * 1000 for x in r.results if x.ok and x.ttft is not None)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r.strategy)
    ax.set_xscale("log")
    _label(ax, "time to first token (ms, log scale)", "fraction of requests", title)
    _save(plt, fig, path)


def plot_per_server(rows: Sequence[Row], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = max(len(r.per_server) for r in rows)
    width = 0.8 / max(1, len(rows))
    for k, r in enumerate(rows):
        ax.bar([i + k * width for i in range(len(r.per_server))], r.per_server, width, label=r.strategy)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(n)], [f"s{i}" for i in range(n)])
    _label(ax, "server", "requests served", title, grid=False)
    _save(plt, fig, path)


def plot_latency_vs_rate(rows: Sequence[Row], path: Path, title: str) -> None:
    """TTFT p50/p90 against the offered rate, one line per strategy."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, rs, rates in _by_strategy_over_rate(rows):
        axes[0].plot(rates, [r.summary.ttft_p90 * 1000 for r in rs], marker="o", label=name)
        axes[1].plot(rates, [r.summary.output_tokens_per_s for r in rs], marker="o", label=name)
    axes[0].set_ylabel("TTFT p90 (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("output tokens/s")
    _finish_rate_axes(plt, fig, axes, path, title)


def plot_ttft_over_time(rows: Sequence[Row], path: Path, title: str) -> None:
    """Each request's TTFT against when it was sent: warm-up and queue build-up show."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ok = [x for x in r.results if x.ok and x.ttft is not None]
        ax.scatter([x.start for x in ok], [x.ttft * 1000 for x in ok], s=6, label=r.strategy, alpha=0.7)
    ax.set_yscale("log")
    _label(ax, "request sent at (s)", "time to first token (ms, log scale)", title)
    _save(plt, fig, path)


def plot_pd(rows: Sequence[Row], path: Path, title: str) -> None:
    """Aggregated vs P/D against the offered rate: TTFT p90, inter-token latency p90 and p99
    (every token gap of the rows' results) and output tokens/s, one line per setup."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for name, rs, rates in _by_strategy_over_rate(rows):
        axes[0].plot(rates, [r.summary.ttft_p90 * 1000 for r in rs], marker="o", label=name)
        axes[1].plot(rates, [r.summary.itl_p90 * 1000 for r in rs], marker="o", label=name)
        p99 = [percentile([x for res in r.results if res.ok for x in res.itl], 99) * 1000 for r in rs]
        axes[2].plot(rates, p99, marker="o", label=name)
        axes[3].plot(rates, [r.summary.output_tokens_per_s for r in rs], marker="o", label=name)
    axes[0].set_ylabel("TTFT p90 (ms, log scale)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("inter-token latency p90 (ms)")
    axes[2].set_ylabel("inter-token latency p99 (ms, log scale)")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("output tokens/s")
    _finish_rate_axes(plt, fig, axes, path, title)
