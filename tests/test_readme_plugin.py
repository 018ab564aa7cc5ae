"""The README's custom scorer, loaded exactly as a platform team would: by module path in
the config, and by an `epp.plugins` entry point of an installed distribution."""

import re
import sys
import textwrap
from pathlib import Path

import pytest

from epp.assembly import load_plugin_set
from epp.config import ConfigError, load_config
from epp.framework import Endpoint, InferenceRequest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def acme(tmp_path, monkeypatch):
    code = re.search(r"```python\n# acme_epp/scorers.py\n(.*?)```", README.read_text(), re.S).group(1)
    pkg = tmp_path / "acme_epp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scorers.py").write_text(code)
    toml = re.search(r'```toml\n(\[project.entry-points."epp.plugins"\]\n.*?)```', README.read_text(), re.S).group(1)
    entry = toml.splitlines()[1].replace('"', "")  # TOML string -> entry_points.txt value
    dist = tmp_path / "acme_epp-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-epp\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[epp.plugins]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for mod in [m for m in sys.modules if m.startswith("acme_epp")]:
        del sys.modules[mod]


def _endpoints():
    return [Endpoint(name=f"ep-{acc}", address=f"10.0.0.{i}", port=8000, labels={"acme.com/accelerator": acc})
            for i, acc in enumerate(["a100", "h200", "t4", "h100"])]


def _request():
    return InferenceRequest(request_id="r1", target_model="m", incoming_model="m", kind="completions",
                            prompt_text="hello", headers={})


@pytest.mark.parametrize("type_name", ["acme_epp.scorers:AcceleratorScorer", "accelerator-scorer"])
def test_readme_scorer_routes_to_preferred_hardware(acme, type_name):
    config = textwrap.dedent(f"""
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - {{type: "{type_name}", name: accelerator-scorer}}
        - type: max-score-picker
        schedulingProfiles:
        - name: default
          plugins: [{{pluginRef: accelerator-scorer, weight: 1}}, {{pluginRef: max-score-picker}}]
        """)
    pipeline = load_plugin_set(config)
    eps = _endpoints()
    for _ in range(5):
        _, result = pipeline.run_cycle(_request(), eps)
        assert result.targets[0].name == "ep-h200"
    scorer = pipeline.plugins["accelerator-scorer"]
    assert scorer.score(None, _request(), eps) == pytest.approx([1 / 3, 1.0, 0.0, 2 / 3])


def test_readme_scorer_parameters_are_validated(acme):
    config = textwrap.dedent("""
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - {type: "acme_epp.scorers:AcceleratorScorer", parameters: {preference: []}}
        """)
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.preference"):
        load_config(config)
