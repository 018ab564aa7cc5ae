"""Every flag of both reference generations parses, with the reference's type and default,
in every form pflag and Go accept; every chart-rendered argv parses. The lists are the
checked-in facts in tests/fixtures/reference/ (flags.txt, flags-v1.5.txt, chart-args.txt)."""

from __future__ import annotations

import json

import pytest

from epp.datalayer.specs import DEFAULT_SPECS
from epp.options import FLAG_BY_NAME, IGNORED_REFERENCE_FLAGS, METRIC_FLAGS, Options, parse_args
from epp.units import parse_duration
from tests.test_reference_fixtures import rows

BASE = ["--endpoints=127.0.0.1:8000"]


def reference_flags() -> list[tuple[str, str, str, str, str]]:
    """(generation, name, type, default, where) of every flag of both generations."""
    return [(generation, *cells) for generation, file in (("current", "flags.txt"), ("v1.5", "flags-v1.5.txt"))
            for cells in rows(file, 4)]


FLAGS = [r for r in reference_flags() if r[1] != "help"]  # -h/--help prints and exits, as pflag's


def base_kind(kind: str) -> str:
    return kind.split(";")[0].split("(")[0]


# A value of the flag's type that differs from the default, and flags a value needs beside it.
VALUES = {"int": "7", "duration": "45s", "intSlice": "8000,8001", "bool": "false", "string": "some-value"}
SPECIAL = {
    "grpc-max-recv-msg-size": ("10MiB", []), "grpc-max-send-msg-size": ("25MB", []),
    "tls-min-version": ("VersionTLS13", []), "tls-cipher-suites": ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", []),
    "zap-encoder": ("json", []), "model-server-metrics-scheme": ("https", []),
    "pool-name": ("my-pool", []), "endpoint-selector": ("app=vllm,env in (prod)", ["--endpoint-target-ports=8000"]),
    "endpoint-target-ports": ("8000,8001", ["--endpoint-selector=app=vllm"]),
    "metrics-client-ca-file": ("/etc/ca.pem", ["--metrics-cert-dir=/etc/metrics"]),
    "metrics-cert-dir": ("/etc/metrics", []),
    "total-queued-requests-metric": ("sglang:num_queue_reqs", []),
    "total-running-requests-metric": ("sglang:num_running_reqs", []),
    "kv-cache-usage-percentage-metric": ("sglang:token_usage", []),
    "lora-info-metric": ("", []), "cache-info-metric": ("sglang:cache_config_info", []),
}
SOURCES = {"pool-name", "endpoint-selector", "endpoint-target-ports"}


def value_for(name: str, kind: str) -> tuple[str, list[str]]:
    if name in SPECIAL:
        return SPECIAL[name]
    return VALUES[base_kind(kind)], []


def argv_for(name: str, form: str, value: str, companions: list[str]) -> list[str]:
    base = [] if name in SOURCES else BASE
    if form == "--name=value":
        flag = [f"--{name}={value}"]
    elif form == "--name value":
        flag = [f"--{name}", value]
    else:  # Go's single dash
        flag = [f"-{name}", value]
    return [*base, *companions, *flag]


def option_value(options: Options, name: str):
    if name in METRIC_FLAGS:
        return options.engine_metric_flags.get(METRIC_FLAGS[name])
    return getattr(options, name.replace("-", "_"))


@pytest.mark.parametrize("form", ["--name=value", "--name value", "-name value"])
@pytest.mark.parametrize(("generation", "name", "kind", "default", "where"), FLAGS,
                         ids=[f"{r[0]}:{r[1]}" for r in FLAGS])
def test_every_reference_flag_parses_with_a_value_of_its_type(generation, name, kind, default, where, form):
    value, companions = value_for(name, kind)
    options = parse_args(argv_for(name, form, value, companions))
    if name in IGNORED_REFERENCE_FLAGS:
        assert name in options.ignored  # reported once at start-up
        return
    got = option_value(options, name)
    expected = {"int": int, "duration": parse_duration, "bool": lambda v: v == "true",
                "intSlice": lambda v: [int(p) for p in v.split(",")]}.get(base_kind(kind), str)(value)
    if name == "grpc-max-recv-msg-size":
        expected = 10 * 2**20
    elif name == "grpc-max-send-msg-size":
        expected = 25 * 10**6
    elif name == "tls-cipher-suites":
        expected = [value]
    assert got == expected, (name, got)
    assert options.ignored == []


@pytest.mark.parametrize(("generation", "name", "kind", "default", "where"),
                         [r for r in FLAGS if base_kind(r[2]) == "bool"], ids=lambda v: str(v))
def test_bool_flags_bare_and_false(generation, name, kind, default, where):
    base = [] if name in SOURCES else BASE
    bare, off = parse_args([*base, f"--{name}"]), parse_args([*base, f"--{name}=false"])
    if name in IGNORED_REFERENCE_FLAGS:
        assert name in bare.ignored and name in off.ignored
    else:
        assert option_value(bare, name) is True and option_value(off, name) is False


@pytest.mark.parametrize("argv", [["-v=4"], ["-v", "4"], ["--v=4"], ["--v", "4"], ["-v4"]])
def test_verbosity_in_every_go_form(argv):
    assert parse_args([*BASE, *argv]).ignored == ["v"]


def test_a_value_of_the_wrong_type_stops_start_up(capsys):
    for bad in (["--v=loud"], ["--drain-timeout=soon"], ["--grpc-max-recv-msg-size=lots"],
                ["--tls-min-version=VersionTLS14"], ["--metrics-endpoint-auth=maybe"],
                ["--tls-cipher-suites=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_BOGUS"]):
        with pytest.raises(SystemExit):
            parse_args([*BASE, *bad])
        assert bad[0].split("=")[0] in capsys.readouterr().err


def reference_default(name: str, kind: str, text: str):
    text = text.split(" (")[0].strip()
    k = base_kind(kind)
    if text == "''":
        return {"intSlice": [], "stringSlice": [], "string": ""}.get(k, 0 if k == "string" else "")
    if k == "int":
        return int(text)
    if k == "bool":
        return text == "true"
    if k == "duration":
        return parse_duration(text)
    if k in ("intSlice", "stringSlice"):
        return []
    return text


@pytest.mark.parametrize(("generation", "name", "kind", "default", "where"), FLAGS,
                         ids=[f"{r[0]}:{r[1]}" for r in FLAGS])
def test_defaults_are_the_references(generation, name, kind, default, where):
    expected = reference_default(name, kind, default)
    if name in METRIC_FLAGS:  # not given: the default engine's spec keeps the reference's default name
        spec = DEFAULT_SPECS["vllm"]
        field = METRIC_FLAGS[name]
        names = spec.kv_cache_usage if field == "kv_cache_usage" else (getattr(spec, field),)
        assert expected in names
        return
    flag = FLAG_BY_NAME[name]
    got = flag.default
    if name.startswith("grpc-max-") and expected == "":
        expected = 0  # '' = unset: the transport's default
    assert got == expected, (name, got, expected)
    if not flag.ignored:
        assert option_value(parse_args(BASE if name not in SOURCES else BASE), name) == expected


def chart_rows() -> list[tuple[str, str, list[str]]]:
    return [(chart, variant, json.loads(argv)) for chart, variant, _, argv in rows("chart-args.txt", 4)]


def swap_pool_flags(argv: list[str]) -> list[str]:
    """The pool flags (and their values) replaced by static --endpoints, as the e2e tests run them."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--pool-name", "--pool-namespace", "--pool-group"):
            skip = True
            continue
        if arg.split("=")[0] in ("--pool-name", "--pool-namespace", "--pool-group"):
            continue
        out.append(arg)
    return [*out, "--endpoints=127.0.0.1:8000"] if "--pool-name" in argv else out


@pytest.mark.parametrize(("chart", "variant", "argv"), chart_rows(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_chart_argv_parses_as_rendered_and_with_static_endpoints(chart, variant, argv):
    for args in (argv, swap_pool_flags(argv)):
        options = parse_args(args)
        assert options.config_file.startswith("/config/") and options.grpc_health_port == 9003
        assert options.tracing == ("--tracing=true" in argv)
        assert options.metrics_endpoint_auth == ("--metrics-endpoint-auth=false" not in argv)
        for value in options.engine_metric_flags.values():  # the v1.5 chart's literal quotes are gone
            assert '"' not in value
        assert '"' not in options.model_server_metrics_path


def test_v15_sglang_chart_metric_flags_rename_the_default_engine():
    ((_, _, argv),) = [r for r in chart_rows() if r[1] == "sglang"]
    options = parse_args(swap_pool_flags(argv))
    assert options.engine_metric_flags == {"waiting_queue": "sglang:num_queue_reqs",
                                           "running_requests": "sglang:num_running_reqs",
                                           "kv_cache_usage": "sglang:token_usage",
                                           "cache_info": "sglang:cache_config_info"}
    from epp.server import apply_metric_flags

    spec = apply_metric_flags(dict(DEFAULT_SPECS), options.engine_metric_flags)["vllm"]
    assert spec.waiting_queue == "sglang:num_queue_reqs" and spec.kv_cache_usage == ("sglang:token_usage",)
    assert spec.lora_info == DEFAULT_SPECS["vllm"].lora_info  # not given: unchanged


def test_v15_trtllm_chart_path_unquoted_and_empty_lora_metric_means_none():
    ((_, _, argv),) = [r for r in chart_rows() if r[1] == "trtllm-serve"]
    options = parse_args(swap_pool_flags(argv))
    assert options.model_server_metrics_path == "/prometheus/metrics"
    from epp.server import apply_metric_flags

    assert apply_metric_flags(dict(DEFAULT_SPECS), options.engine_metric_flags)["vllm"].lora_info == ""


def test_v15_triton_chart_metric_specs_with_label_matchers_are_kept():
    ((_, _, argv),) = [r for r in chart_rows() if r[1] == "triton-tensorrt-llm"]
    from epp.server import StartupError, apply_metric_flags

    spec = apply_metric_flags(dict(DEFAULT_SPECS), parse_args(swap_pool_flags(argv)).engine_metric_flags)["vllm"]
    assert spec.waiting_queue == "nv_trt_llm_request_metrics{request_type=waiting}"
    assert spec.kv_cache_usage == ("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",)
    with pytest.raises(StartupError, match="--total-queued-requests-metric: not a metric specification"):
        apply_metric_flags(dict(DEFAULT_SPECS), {"waiting_queue": "bad name!"})


def test_v15_https_scraping_flags():
    from epp.server import scrape_tls

    assert scrape_tls(parse_args(BASE)) is None
    import ssl

    insecure = scrape_tls(parse_args([*BASE, "--model-server-metrics-scheme=https"]))
    assert insecure.verify_mode == ssl.CERT_NONE  # the reference's default: skip verification
    verified = scrape_tls(parse_args([*BASE, "--model-server-metrics-scheme", "https",
                                      "--model-server-metrics-https-insecure-skip-verify=false"]))
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-server-metrics-scheme=ftp"], "invalid choice"),
    (["--metrics-client-ca-file=/ca.pem"], "requires --metrics-cert-dir"),
    (["--metrics-cert-dir=/d", "--metrics-endpoint-auth=false"], "without authentication"),
    (["--endpoint-selector=app=a", "--endpoint-target-ports=1,2,3,4,5,6,7,8,9"], "at most 8"),
])
def test_values_the_picker_cannot_honour_stop_start_up(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([*([] if "--endpoint-selector=app=a" in argv else BASE), *argv])
    assert message in capsys.readouterr().err


def test_refresh_interval_clamped_and_target_ports_deduplicated():
    o = parse_args(["--endpoint-selector=app=a", "--endpoint-target-ports=8000,8000", "--endpoint-target-ports=8001",
                    "--refresh-metrics-interval=10ms"])
    assert o.refresh_metrics_interval == 0.05 and o.endpoint_target_ports == [8000, 8001]


def test_tls_flag_names_are_validated_naming_the_flag():
    from epp.tls import TLSSettings

    with pytest.raises(ValueError, match="--tls-cipher-suites: unknown cipher suite 'TLS_BOGUS'"):
        TLSSettings("", ("TLS_BOGUS",))
    assert TLSSettings("VersionTLS12", ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256")) \
        .openssl_ciphers() == "ECDHE-RSA-AES128-GCM-SHA256"
