"""Static discovery: --endpoints parsing, the endpoints file, and live reload."""

import os
import textwrap

import pytest

from epp.datalayer.datastore import Datastore
from epp.discovery.static import (
    StaticDiscovery,
    endpoints_from_flag,
    parse_endpoints_file,
    parse_hostport,
)
from epp.framework import ENGINE_TYPE_LABEL, ROLE_LABEL
from tests.helpers import plugin
from tests.servers import eventually

FILE = textwrap.dedent("""\
    endpoints:
    - name: vllm-0
      address: 10.0.0.1
      port: 8000
      labels: {inference.networking.k8s.io/engine-type: vllm, llm-d.ai/role: decode}
    - address: "fd00::2"
      port: 8001
    modelRewrites:
    - name: rw1
      rules:
      - matches: [{model: {type: Exact, value: food-review}}]
        targets: [{modelRewrite: food-review-v2, weight: 90}, {modelRewrite: food-review-v1, weight: 10}]
    objectives:
    - {name: batch, priority: -1}
    - {name: interactive}
    """)


def test_flag_endpoints_v4_and_bracketed_v6():
    specs = endpoints_from_flag(["10.0.0.1:8000", " [::1]:9000", "[fd00:0::3]:80"])
    assert [(s.name, s.address, s.port) for s in specs] == [
        ("ep-10.0.0.1-8000", "10.0.0.1", 8000), ("ep-::1-9000", "::1", 9000), ("ep-fd00::3-80", "fd00::3", 80)]


@pytest.mark.parametrize("text,fragment", [
    ("10.0.0.1", "not ip:port"),
    ("::1:80", "bracket IPv6"),
    ("[::1]80", "not [ipv6]:port"),
    ("host.example:80", "not an IP address"),
    ("10.0.0.1:http", "not an integer"),
    ("10.0.0.1:70000", "out of range"),
])
def test_flag_errors(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_hostport(text, "--endpoints[0]")
    assert str(e.value).startswith("--endpoints[0]:") and fragment in str(e.value)


def test_flag_duplicates_rejected():
    with pytest.raises(ValueError, match=r"--endpoints\[1\]: duplicate"):
        endpoints_from_flag(["10.0.0.1:80", "10.0.0.1:80"])


def test_file_parses_endpoints_rewrites_objectives():
    pool = parse_endpoints_file(FILE)
    assert [(e.name, e.address, e.port) for e in pool.endpoints] == [
        ("vllm-0", "10.0.0.1", 8000), ("ep-fd00::2-8001", "fd00::2", 8001)]
    assert pool.endpoints[0].labels == {ENGINE_TYPE_LABEL: "vllm", ROLE_LABEL: "decode"}
    rule = pool.rewrites[0].rules[0]
    assert rule.matches == ("food-review",)
    assert [(t.model_rewrite, t.weight) for t in rule.targets] == [("food-review-v2", 90), ("food-review-v1", 10)]
    assert [(o.name, o.priority) for o in pool.objectives] == [("batch", -1), ("interactive", 0)]
    assert parse_endpoints_file("") == parse_endpoints_file("endpoints: []")


@pytest.mark.parametrize("text,key", [
    ("endpoints:\n- {address: 10.0.0.1, port: 80}\n- {address: 10.0.0.2, port: eighty}", "endpoints[1].port: expected an integer"),
    ("endpoints:\n- {address: 10.0.0.1, port: 80, weight: 2}", "endpoints[0].weight: unknown key"),
    ("endpoints:\n- {port: 80}", "endpoints[0].address: required"),
    ("endpoints:\n- {address: my-host, port: 80}", "endpoints[0].address:"),
    ("endpoints:\n- {address: 10.0.0.1, port: 0}", "endpoints[0].port: 0 is out of range"),
    ("endpoints:\n- {address: 10.0.0.1, port: 80, labels: {a: 1}}", "endpoints[0].labels.a: expected a string"),
    ("endpoints:\n- {name: %s, address: 10.0.0.1, port: 80}" % ("n" * 254), "endpoints[0].name: longer than 253"),
    ("endpoints:\n- {name: x, address: 10.0.0.1, port: 80}\n- {name: x, address: 10.0.0.2, port: 80}",
     "endpoints[1].name: duplicate"),
    ("endpoints:\n- {address: 10.0.0.1, port: 80}\n- {name: y, address: 10.0.0.1, port: 80}",
     "endpoints[1]: same address and port as endpoints[0]"),
    ("endpoints: {a: 1}", "endpoints: expected a list"),
    ("pods: []", "(top level).pods: unknown key"),
    ("modelRewrites:\n- {name: r, rules: [{targets: [{modelRewrite: m, weight: 0}]}]}",
     "modelRewrites[0].rules[0].targets[0].weight: 0 is out of range"),
    ("modelRewrites:\n- {name: r, rules: [{matches: [{model: {type: Prefix, value: a}}], targets: [{modelRewrite: m}]}]}",
     "modelRewrites[0].rules[0].matches[0].model.type"),
    ("modelRewrites:\n- {name: r, rules: [{matches: [{model: {value: a}}]}]}",
     "modelRewrites[0].rules[0].targets: at least one"),
    ("objectives:\n- {name: o, priority: high}", "objectives[0].priority: expected an integer"),
    ("objectives:\n- {priority: 1}", "objectives[0].name: required"),
    ("endpoints: [", "not valid YAML"),
])
def test_file_errors_name_the_key(text, key):
    with pytest.raises(ValueError) as e:
        parse_endpoints_file(text)
    assert key in str(e.value)


def replace_file(path, text):
    """Write as editors do: a new file renamed over the old one (new inode)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def test_discovery_from_flags_marks_synced():
    ds = Datastore()
    d = StaticDiscovery(ds, endpoints=["10.0.0.1:8000", "[::1]:8001"])
    await d.start()
    assert ds.synced and [e.hostport for e in ds.endpoints()] == ["10.0.0.1:8000", "[::1]:8001"]
    await d.stop()


async def test_bad_file_at_start_raises_naming_the_key(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("endpoints:\n- {address: 10.0.0.1, port: x}\n")
    d = StaticDiscovery(Datastore(), file=str(path))
    with pytest.raises(ValueError, match=r"endpoints\[0\]\.port: expected an integer"):
        await d.start()
    with pytest.raises(ValueError, match="No such file"):
        await StaticDiscovery(Datastore(), file=str(tmp_path / "missing.yaml")).start()


async def test_file_edits_apply_live_and_bad_edits_keep_state(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text(FILE)
    ds = Datastore()
    d = StaticDiscovery(ds, file=str(path), poll_interval=0.02)
    await d.start()
    try:
        assert ds.synced and [e.name for e in ds.endpoints()] == ["ep-fd00::2-8001", "vllm-0"]
        assert ds.rewrite_model("food-review") in ("food-review-v1", "food-review-v2")
        assert ds.objectives["batch"].priority == -1
        kept = ds.get("vllm-0")

        # Rename-replace: one endpoint relabelled, one removed, one added; rules and objectives change.
        replace_file(path, textwrap.dedent("""\
            endpoints:
            - {name: vllm-0, address: 10.0.0.1, port: 8000, labels: {llm-d.ai/role: prefill}}
            - {name: vllm-2, address: 10.0.0.3, port: 8000}
            modelRewrites:
            - name: rw1
              rules: [{targets: [{modelRewrite: base}]}]
            objectives: [{name: batch, priority: 5}]
            """))
        await eventually(lambda: ds.get("vllm-2") is not None, "the added endpoint")
        assert [e.name for e in ds.endpoints()] == ["vllm-0", "vllm-2"]
        assert ds.get("vllm-0") is kept and kept.labels == {ROLE_LABEL: "prefill"}  # same object, new labels
        assert ds.rewrite_model("anything") == "base" and ds.objectives["batch"].priority == 5
        assert "interactive" not in ds.objectives

        # In-place edit with a bad key: logged, previous state kept.
        reloads = d.reloads
        path.write_text("endpoints:\n- {name: vllm-9, address: 10.0.0.9, port: 80, colour: red}\n")
        await eventually(lambda: d.last_error != "", "the bad edit to be rejected")
        assert "endpoints[0].colour: unknown key" in d.last_error
        assert [e.name for e in ds.endpoints()] == ["vllm-0", "vllm-2"] and d.reloads == reloads

        # Deleted, then restored: still the previous state meanwhile; the fix applies.
        path.unlink()
        await eventually(lambda: "gone" in d.last_error, "the missing file to be noticed")
        assert len(ds.endpoints()) == 2
        replace_file(path, "endpoints:\n- {name: vllm-9, address: 10.0.0.9, port: 80}\n")
        await eventually(lambda: [e.name for e in ds.endpoints()] == ["vllm-9"], "the fixed file")
        assert d.last_error == "" and ds.rewrites() == () and ds.objectives == {}
    finally:
        await d.stop()


async def test_rename_replace_keeping_size_and_mtime_is_noticed(tmp_path):
    """Only the inode tells this edit apart: same size, same mtime (os.utime), new file."""
    path = tmp_path / "eps.yaml"
    old = "endpoints:\n- {name: vllm-a, address: 10.0.0.1, port: 8000}\n"
    new = "endpoints:\n- {name: vllm-b, address: 10.0.0.2, port: 8000}\n"
    assert len(old) == len(new)
    path.write_text(old)
    ds = Datastore()
    d = StaticDiscovery(ds, file=str(path), poll_interval=0.02)
    await d.start()
    try:
        assert [e.name for e in ds.endpoints()] == ["vllm-a"]
        before = os.stat(path)
        tmp = tmp_path / "eps.yaml.tmp"
        tmp.write_text(new)
        os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(tmp, path)
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        assert after.st_ino != before.st_ino
        await eventually(lambda: [e.name for e in ds.endpoints()] == ["vllm-b"], "the replaced file", timeout=5)
        assert d.reloads == 2
    finally:
        await d.stop()


# --------------------------------------------------------------------------- file-discovery
REFERENCE_FILE = textwrap.dedent("""\
    endpoints:
      - name: vllm-0
        address: "10.0.0.1"
        port: "8000"
        labels: {llm-d.ai/engine-type: sglang}
      - name: vllm-1
        namespace: serving
        address: "10.0.0.2"
        port: "8000"
    """)


def file_discovery(parameters: dict):
    return plugin("file-discovery", parameters, where="plugins[0]")


async def test_file_discovery_reads_the_references_format_once_without_watch_file(tmp_path):
    path = tmp_path / "endpoints.yaml"
    path.write_text(REFERENCE_FILE)
    ds = Datastore()
    d = file_discovery({"path": str(path)}).discovery(ds)
    await d.start()
    try:
        assert ds.synced and {e.name: (e.hostport, e.namespace) for e in ds.endpoints()} == {
            "vllm-0": ("10.0.0.1:8000", "default"), "vllm-1": ("10.0.0.2:8000", "serving")}
        assert ds.get("vllm-0").labels == {"llm-d.ai/engine-type": "sglang"}
        assert d._task is None  # noqa: SLF001 - watchFile defaults to false: nothing watches the file
    finally:
        await d.stop()


async def test_file_discovery_json_and_watch_file(tmp_path):
    path = tmp_path / "endpoints.json"
    path.write_text('{"endpoints": [{"name": "a", "address": "10.0.0.1", "port": "8000"}]}')
    ds = Datastore()
    d = file_discovery({"path": str(path), "watchFile": True}).discovery(ds)
    d.poll_interval = 0.02
    await d.start()
    try:
        assert [e.name for e in ds.endpoints()] == ["a"]
        replace_file(path, '{"endpoints": [{"name": "b", "address": "10.0.0.2", "port": 8001}]}')
        await eventually(lambda: [e.hostport for e in ds.endpoints()] == ["10.0.0.2:8001"], "the edit")
    finally:
        await d.stop()


async def test_file_discovery_path_required_and_size_bound(tmp_path):
    from epp.framework import PluginError

    with pytest.raises(PluginError, match=r"parameters\.path: file-discovery: 'path' parameter is required"):
        file_discovery({"watchFile": True})
    with pytest.raises(PluginError, match=r"parameters\.watch: unknown parameter"):
        file_discovery({"path": "/x", "watch": True})
    big = tmp_path / "big.yaml"
    big.write_text("endpoints: []\n" + "#" * (1 << 20))
    with pytest.raises(ValueError, match=r"big.yaml: endpoints file exceeds 1048576 bytes \(1 MiB\)"):
        await file_discovery({"path": str(big)}).discovery(Datastore()).start()
    bad_port = tmp_path / "bad.yaml"
    bad_port.write_text('endpoints: [{name: a, address: "10.0.0.1", port: "80a"}]\n')
    with pytest.raises(ValueError, match=r"endpoints\[0\]\.port: expected an integer"):
        await file_discovery({"path": str(bad_port)}).discovery(Datastore()).start()
