"""Packaging: the runtime (`pip install .` without extras, the Dockerfile's image) serves without
the simulator, the benchmarks, the dev stack or matplotlib; the commands that need them name
their extra instead of failing with a traceback."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import urllib.request
from pathlib import Path

import pytest

from devstack.launch import Process, free_ports, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEV_ONLY = {"simulator", "bench", "devstack"}  # top-level packages kept out of the picker image
NEVER_IN_SERVE = (*sorted(DEV_ONLY), "matplotlib")
NOT_IN_RUNTIME = ("numpy",)  # comes only with the [bench] extra: serve must work without it


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def listed_packages() -> set[str]:
    """Top-level packages of the tree that pyproject's `packages.find include` selects."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    return {t for t in tops if any(re.fullmatch(pat.replace("*", ".*"), t) for pat in include)}


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            stages.append((line, []))
        elif line and not line.startswith("#") and stages:
            stages[-1][1].append(line)
    return stages


def stage_chain(stages: list[tuple[str, list[str]]], index: int) -> list[str]:
    """Instructions that build stage `index` plus every stage it copies from or starts FROM."""
    names = {m.group(1): i for i, (f, _) in enumerate(stages) if (m := re.search(r" AS (\S+)", f))}
    out: list[str] = []
    todo, seen = [index], set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        base = stages[i][0].split()[1]
        if base in names:
            todo.append(names[base])
        for ins in stages[i][1]:
            out.append(ins)
            if (m := re.search(r"--from=(\S+)", ins)) and m.group(1) in names:
                todo.append(names[m.group(1)])
    return out


def copied_sources(instructions: list[str]) -> set[str]:
    return {src for ins in instructions if ins.startswith("COPY ") and "--from=" not in ins
            for src in ins.split()[1:-1]}


def test_no_runtime_module_imports_dev_tooling_or_matplotlib():
    """Anywhere in epp/, filters/, scorers/ (inside functions too): `epp sim|bench|demo` are
    dispatched by module-name strings in epp/cli.py, never imported."""
    bad = []
    for pkg in ("epp", "filters", "scorers"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                        if n.partition(".")[0] in NEVER_IN_SERVE]
    assert bad == []


def test_pyproject_extras_keep_plots_out_of_the_runtime():
    project = pyproject()["project"]
    deps = " ".join(project["dependencies"])
    assert "matplotlib" not in deps
    extras = project["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["bench"])
    assert "sim" in extras  # the simulator needs nothing beyond the runtime's dependencies
    assert "epp[sim,bench]" in extras["dev"]
    assert "[dev,sim,bench]" in (ROOT / "Makefile").read_text()


def test_the_picker_image_copies_exactly_the_runtime_packages():
    stages = dockerfile_stages()
    final = stage_chain(stages, len(stages) - 1)
    assert 'ENTRYPOINT ["epp", "serve"]' in final
    sources = copied_sources(final)
    runtime = listed_packages() - DEV_ONLY
    assert runtime == {"epp", "filters", "scorers", "proto"}
    assert sources == runtime | {"pyproject.toml", "README.md"}
    installs = [ins for ins in final if "pip install" in ins]
    assert installs and not any("[" in ins for ins in installs), installs  # no extras in the picker image
    # The simulator image (`--target sim`) adds only the simulator.
    (sim,) = [i for i, (f, _) in enumerate(stages) if f.endswith(" AS sim")]
    assert copied_sources(stage_chain(stages, sim)) == sources | {"simulator"}
    assert 'ENTRYPOINT ["epp", "sim"]' in stage_chain(stages, sim)


@pytest.fixture(scope="module")
def image_install(tmp_path_factory) -> Path:
    """`pip install --no-deps .` of a tree holding only what the picker image COPYs."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in copied_sources(stage_chain(dockerfile_stages(), len(dockerfile_stages()) - 1)):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-compile", "--target", str(target), "."], cwd=src, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return target


def test_pip_install_without_the_dev_packages_installs_the_runtime(image_install):
    tops = {p.name for p in image_install.iterdir() if (p / "__init__.py").is_file()}
    assert tops == {"epp", "filters", "scorers", "proto"}
    assert (image_install / "bin" / "epp").is_file()


def image_python(target: Path, code: str, *args: str) -> list[str]:
    """argv of a Python that sees the image install and the runtime's dependencies but not this
    source tree: -S skips site-packages' .pth files (the editable install), then the
    dependencies' directory is appended by hand."""
    prelude = (f"import sys; sys.path[:] = [{str(target)!r}] + [p for p in sys.path if p and "
               f"not p.startswith({str(ROOT)!r})] + [{sysconfig.get_paths()['purelib']!r}]\n")
    return [sys.executable, "-S", *args, "-c", prelude + textwrap.dedent(code)]


def test_installed_runtime_names_the_extras_it_lacks(image_install):
    code = """
        from epp.cli import main
        assert main(["--help"]) == 0
        for cmd in ("sim", "bench", "demo"):
            assert main([cmd]) == 1, cmd
        import epp.server
        print(sorted(m for m in sys.modules if m.partition(".")[0] in ("simulator", "bench", "devstack")))
    """
    r = subprocess.run(image_python(image_install, code, "-I"), capture_output=True, text=True, timeout=60,
                       cwd=image_install)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]" and "serve" in r.stdout
    assert "Traceback" not in r.stderr
    for cmd, extra in (("sim", "sim"), ("bench", "bench"), ("demo", "bench")):
        assert f"`epp {cmd}` needs the [{extra}] extra: pip install 'epp[{extra}]'" in r.stderr, r.stderr


def test_installed_epp_serve_imports_no_dev_tooling_nor_matplotlib(image_install, tmp_path):
    """The installed picker serves (ready, /metrics) with a finder that records, and refuses,
    every import of the dev tooling or matplotlib, even one a try/except would hide; numpy
    (absent from a runtime install) is refused too."""
    grpc, health, metrics, api = free_ports(4)
    seen = tmp_path / "imports.txt"
    code = f"""
        import importlib.abc
        class Recorder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.partition(".")[0]
                if name == "epp.server" or top in {NEVER_IN_SERVE!r}:
                    with open({str(seen)!r}, "a") as f:
                        f.write(name + "\\n")
                if top in {NEVER_IN_SERVE + NOT_IN_RUNTIME!r}:
                    raise ModuleNotFoundError(name, name=name)
        sys.meta_path.insert(0, Recorder())
        from epp.cli import main
        sys.exit(main(["serve", "--bind-address", "127.0.0.1", "--endpoints", "127.0.0.1:1",
                       "--grpc-port={grpc}", "--grpc-health-port={health}", "--metrics-port={metrics}",
                       "--api-port={api}"]))
    """
    log = tmp_path / "serve.log"
    with Process(image_python(image_install, code), name="epp serve", log_path=log, cwd=str(image_install)) as p:
        wait_until(lambda: not p.alive() or "epp: ready" in log.read_text(errors="replace"), 60, "epp serve")
        assert p.alive(), p.log_tail()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            assert b"inference_pool_ready_pods" in r.read()
    assert seen.read_text().split() == ["epp.server"]  # the finder ran, and saw nothing else
    assert "Traceback" not in log.read_text()


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from epp.cli import main
sys.exit(main(ARGV))
"""


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    ("simulator", ["sim", "--port", "1"], "sim"),
    ("matplotlib", ["bench", "cluster"], "bench"),
    ("matplotlib", ["demo"], "bench"),
    ("bench", ["bench", "routing"], "bench"),
])
def test_commands_without_their_extra_name_it(blocked, argv, extra):
    code = f"BLOCKED = {{{blocked!r}}}\nARGV = {argv!r}\n" + BLOCKER
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    assert f"module {blocked!r} is not installed; `epp {argv[0]}` needs the [{extra}] extra" in r.stderr
    assert "Traceback" not in r.stderr


def test_console_script_help_without_extras():
    script = Path(sys.executable).parent / "epp"
    code = ("BLOCKED = {'simulator', 'bench', 'devstack', 'matplotlib'}\nARGV = ['--help']\n" + BLOCKER)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "serve" in r.stdout and "(extra [sim])" in r.stdout, r.stderr
    if script.is_file():
        r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage: epp <command>" in r.stdout, r.stderr


def test_otlp_exporter_protos_survive_xds_protos():
    """xds-protos ships an older `opentelemetry/proto`; setup and the image reinstall
    opentelemetry-proto last so the OTLP trace exporter (and Envoy's protos) import together."""
    code = ("import envoy.service.ext_proc.v3.external_processor_pb2\n"
            "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
            "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fix = "--force-reinstall --no-deps"
    assert fix in (ROOT / "Makefile").read_text() and fix in (ROOT / "Dockerfile").read_text()
