"""The house rules on imports, read from the source (every import statement, also those
inside functions and under TYPE_CHECKING): the core never names a plugin, no plugin
imports another, and the runtime package imports no dev tooling."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from epp.framework.registry import BUILTINS, plugin_class

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = "epp.framework.registry"
DEV_TOOLING = ("devstack", "bench", "simulator")
PLUGIN_PACKAGES = ("filters", "scorers")
# What a plugin module may import from epp: the contracts and small utilities, never a runtime layer.
# The KV-event library (wire decoding, block keys, block index, ZMQ intake) and the data
# layer's payload-kind names are libraries a producer owns instances of, not a runtime layer;
# epp.tls gives the HTTP sources their client TLS context; epp.scheduling.sessionaffinity is the
# session-affinity filter's and scorer's shared binding store (the reference's util/sessionaffinity).
PLUGIN_MAY_USE = ("epp.framework", "epp.units", "epp.netaddr", "epp.labelselector", "epp.errors", "epp.httpbody",
                  "epp.datalayer.kvevents", "epp.datalayer.kinds", "epp.tls",
                  "epp.scheduling.sessionaffinity")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> set[str]:
    """Every module an import statement in `path` loads: for `from a import b`, `a`, and
    `a.b` too when b is a submodule of the tree."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}", root))
    return out


def is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def within(module: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def plugin_modules(root: Path) -> set[str]:
    """The modules the registry table points at, and every module of the plugin packages."""
    mods = {target.partition(":")[0] for target in BUILTINS.values()}
    for pkg in PLUGIN_PACKAGES:
        mods |= {module_name(p, root) for p in (root / pkg).glob("*.py") if p.name != "__init__.py"}
    return mods


def violations(root: Path) -> list[str]:
    plugins = plugin_modules(root)
    found = []
    for pkg in ("epp", *PLUGIN_PACKAGES):
        for path in sorted((root / pkg).rglob("*.py")):
            me = module_name(path, root)
            for target in sorted(imports(path, root)):
                if me in plugins:
                    if target != me and (target in plugins or within(target, PLUGIN_PACKAGES) and target not in
                                         PLUGIN_PACKAGES):
                        found.append(f"plugin {me} imports plugin {target}")
                    elif (within(target, ("epp",)) and target != "epp" and not within(target, PLUGIN_MAY_USE)
                          and target.rpartition(".")[0] != me.rpartition(".")[0]):
                        found.append(f"plugin {me} imports runtime {target}")
                elif me.startswith("epp") and me != REGISTRY and (target in plugins or within(target, PLUGIN_PACKAGES)):
                    found.append(f"core {me} imports plugin {target}")
                if within(target, DEV_TOOLING) and me.startswith("epp"):
                    found.append(f"runtime {me} imports dev tooling {target}")
    return found


def test_import_rules_hold():
    assert violations(ROOT) == []


def test_the_walk_sees_imports_inside_functions_and_type_checking(tmp_path):
    (tmp_path / "epp").mkdir()
    (tmp_path / "scorers").mkdir()
    (tmp_path / "filters").mkdir()
    (tmp_path / "scorers" / "a.py").write_text("def f():\n    from scorers import b\n")
    (tmp_path / "scorers" / "b.py").write_text("")
    (tmp_path / "epp" / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from filters.labels import DecodeFilter\n")
    (tmp_path / "epp" / "y.py").write_text("def g():\n    import bench.cluster\n    from . import z\n")
    (tmp_path / "scorers" / "c.py").write_text("from epp.framework import Endpoint\nfrom epp import units\n"
                                               "from epp.datalayer.datastore import Datastore\n")
    assert violations(tmp_path) == [
        "core epp.x imports plugin filters.labels",
        "runtime epp.y imports dev tooling bench.cluster",
        "plugin scorers.a imports plugin scorers.b",
        "plugin scorers.c imports runtime epp.datalayer.datastore",
    ]


@pytest.mark.parametrize("type_name", sorted(BUILTINS))
def test_every_table_entry_loads_its_plugin(type_name):
    assert plugin_class(type_name).type_name == type_name


def test_a_config_imports_only_the_plugins_it_names():
    import subprocess
    import sys

    code = ("import sys; from epp.assembly import load_plugin_set; load_plugin_set(None); "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('filters', 'scorers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["scorers", "scorers.load", "scorers.prefix"]  # the default profile's scorers
