"""epp.labelselector: the one Kubernetes label-selector matcher (string syntax and
matchLabels/matchExpressions), used by discovery and the label-selector-filter."""

import pytest

from epp.labelselector import LabelSelector, Requirement


@pytest.mark.parametrize("text,labels,match", [
    ("app=a", {"app": "a"}, True),
    ("app==a,role!=prefill", {"app": "a", "role": "decode"}, True),
    ("app=a,role!=prefill", {"app": "a", "role": "prefill"}, False),
    ("app=a,role!=prefill", {"role": "decode"}, False),
    ("role in (decode, both)", {"role": "both"}, True),
    ("role in (decode, both)", {}, False),
    ("role notin (decode,both)", {"role": "decode"}, False),
    ("role notin (decode)", {}, True),
    ("gpu,!canary", {"gpu": ""}, True),
    ("gpu,!canary", {"gpu": "", "canary": "1"}, False),
    ("gpu", {}, False),
    ("", {"x": "y"}, True),
])
def test_string_syntax(text, labels, match):
    assert LabelSelector.parse(text).matches(labels) is match


def test_string_syntax_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse 'app=a=b'"):
        LabelSelector.parse("app=a=b")


@pytest.mark.parametrize("labels,match", [
    ({"app": "a", "tier": "gpu", "zone": "z1"}, True),
    ({"app": "a", "tier": "gpu"}, True),  # NotIn: an absent key matches
    ({"app": "a", "tier": "gpu", "zone": "z9"}, False),
    ({"app": "b", "tier": "gpu"}, False),  # matchLabels is ANDed with the expressions
    ({"app": "a"}, False),  # Exists
    ({"app": "a", "tier": "gpu", "canary": "1"}, False),  # DoesNotExist
    ({"app": "a", "tier": "cpu"}, False),  # In
])
def test_match_labels_and_expressions(labels, match):
    sel = LabelSelector.from_spec({"app": "a"}, [
        ("tier", "Exists", []), ("tier", "In", ["gpu", "tpu"]), ("zone", "NotIn", ["z9"]),
        ("canary", "DoesNotExist", [])])
    assert sel.matches(labels) is match


def test_empty_selector_matches_everything():
    assert LabelSelector.from_spec({}, []).matches({}) and LabelSelector().matches({"a": "b"})


@pytest.mark.parametrize("op,values,message", [
    ("Equals", ["x"], "operator: expected one of In, NotIn, Exists, DoesNotExist"),
    ("In", [], "operator In needs at least one value"),
    ("Exists", ["x"], "operator Exists takes no values"),
])
def test_requirement_validation(op, values, message):
    with pytest.raises(ValueError, match=message):
        Requirement("k", op, frozenset(values))
