"""`epp <command>`: thin dispatch; each command parses its own flags and calls in.

Commands are named by module string and imported only when run, so `epp serve` never
imports the simulator, the benchmarks or the dev stack; those ship with the source tree
and the `sim`/`bench` extras, and a command whose modules are missing says which extra
to install instead of failing with a traceback."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Command:
    module: str
    help: str
    extra: str = ""  # the pyproject extra that brings `requires`; "" = the runtime
    requires: tuple[str, ...] = ()  # top-level modules the command needs beyond the runtime


_BENCH = ("bench", "devstack", "matplotlib")
COMMANDS = {
    "serve": Command("epp.server", "run the endpoint picker (ext_proc, health, metrics, project API)"),
    "sim": Command("simulator.cli", "run vLLM-compatible simulated model servers", "sim", ("simulator",)),
    "endpoints": Command("epp.apicli", "list a running picker's endpoints and their metrics"),
    "explain": Command("epp.apicli", "ask a running picker why a request would go where it goes"),
    "bench": Command("bench.cli", "benchmarks: routing (real stack), cluster (virtual time), soak, picker, sim",
                     "bench", (*_BENCH, "simulator")),
    "demo": Command("bench.demo", "the whole stack locally: picker vs. round-robin on a shared-prefix workload",
                    "bench", (*_BENCH, "simulator")),
}


def usage() -> str:
    lines = ["usage: epp <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {c.help}" + (f" (extra [{c.extra}])" if c.extra else "")
              for name, c in COMMANDS.items()]
    return "\n".join(lines)


def missing_module(requires: tuple[str, ...]) -> str | None:
    """The first of `requires` that cannot be found (found without importing it)."""
    for name in requires:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


def missing_extra(command: str, module: str) -> str:
    extra = COMMANDS[command].extra
    return (f"epp {command}: module {module!r} is not installed; `epp {command}` needs the [{extra}] extra: "
            f"pip install 'epp[{extra}]' (from a source checkout: pip install '.[{extra}]')")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"epp: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    spec = COMMANDS[command]
    absent = missing_module(spec.requires)
    if absent is None:
        try:
            module = importlib.import_module(spec.module)
        except ModuleNotFoundError as e:
            top = (e.name or "").partition(".")[0]
            if top not in spec.requires:
                raise
            absent = top
    if absent is not None:
        print(missing_extra(command, absent), file=sys.stderr)
        return 1
    # Modules serving several commands take the command name first.
    if getattr(module, "MULTI_COMMAND", False):
        return int(module.main([command, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
