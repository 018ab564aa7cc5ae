"""`epp <command>`: thin dispatch; each command parses its own flags and calls in."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "serve": ("epp.server", "run the endpoint picker (ext_proc, health, metrics, project API)"),
    "sim": ("simulator.cli", "run vLLM-compatible simulated model servers"),
    "endpoints": ("epp.apicli", "list a running picker's endpoints and their metrics"),
    "explain": ("epp.apicli", "ask a running picker why a request would go where it goes"),
    "bench": ("bench.cli", "benchmarks: routing (real stack), cluster (virtual time), picker, sim"),
    "demo": ("bench.demo", "the whole stack locally: picker vs. round-robin on a shared-prefix workload"),
}


def usage() -> str:
    lines = ["usage: epp <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"epp: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    # Modules serving several commands take the command name first.
    if getattr(module, "MULTI_COMMAND", False):
        return int(module.main([command, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
