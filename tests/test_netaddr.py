"""epp.netaddr: one host:port parser for flags, the endpoints file, subset hints, the
testing filter's header, the CLI and Envoy bootstraps."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.netaddr import bracket, join_hostport, parse_hostport, parse_ip, split_hostport, split_list

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: a.compressed)
ports = st.integers(1, 65535)
names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(ipv4, ipv6), port=ports)
def test_written_addresses_parse_back(host, port):
    text = join_hostport(host, port)
    assert parse_hostport(text, "w") == (host, port)
    assert split_hostport(f"  {text} ") == (host, str(port))


@settings(max_examples=100, deadline=None)
@given(host=names, port=ports)
def test_host_names_parse_back_when_ip_is_not_required(host, port):
    assert parse_hostport(f"{host}:{port}", "--addr", ip=False) == (host, port)
    with pytest.raises(ValueError, match=r"^--addr: .* is not an IP address"):
        parse_hostport(f"{host}:{port}", "--addr")


def splits_or_fails_cleanly(text: str) -> None:
    host, port = split_hostport(text)  # never raises
    assert isinstance(host, str) and isinstance(port, str)
    try:
        h, p = parse_hostport(text, "where")
    except ValueError as e:
        assert str(e).startswith("where: ")
    else:
        assert 0 < p < 65536 and ipaddress.ip_address(h).compressed == h


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_splits_or_fails_cleanly(text):
    splits_or_fails_cleanly(text)


@pytest.mark.parametrize("text", ["", "[", "[::1", ":", "]:80", "[::1]:", "1.2.3.4:0", "1.2.3.4:-1", "[x]:80"])
def test_edge_texts_split_or_fail_cleanly(text):
    splits_or_fails_cleanly(text)


@settings(max_examples=100, deadline=None)
@given(entries=st.lists(st.tuples(st.one_of(ipv4, ipv6), st.one_of(st.none(), ports)), max_size=6))
def test_address_lists_keep_bare_and_bracketed_entries(entries):
    written = [join_hostport(h, p) if p is not None else h for h, p in entries]
    expected = [(h, str(p) if p is not None else "") for h, p in entries]
    assert split_list(", ".join(written) + ",") == expected
    assert split_list(written) == expected


def test_bare_and_bracketed_forms():
    assert split_hostport("fd00::1") == ("fd00::1", "")
    assert split_hostport("[fd00::1]") == ("fd00::1", "")
    assert split_hostport("10.0.0.1") == ("10.0.0.1", "")
    assert bracket("fd00::1") == "[fd00::1]" and bracket("[fd00::1]") == "[fd00::1]" and bracket("h") == "h"
    assert parse_hostport("[0:0::1]:80", "w") == ("::1", 80)  # compressed
    with pytest.raises(ValueError, match=r"^w\.address: 'x' in 'x:1' is not an IP address$"):
        parse_ip("x", "w.address", "x:1")
    with pytest.raises(ValueError, match="has no host"):
        parse_hostport(":80", "--addr", ip=False)
