import pytest

from epp.options import parse_args, parse_duration


def test_go_style_flags_parse():
    o = parse_args(["-pool-name=p", "--secure-serving=false", "--refresh-metrics-interval=50ms",
                    "--metrics-staleness-threshold", "2s", "--v=3", "--grpc-port=9102"])
    assert o.pool_name == "p" and o.secure_serving is False
    assert o.refresh_metrics_interval == pytest.approx(0.05)
    assert o.metrics_staleness_threshold == 2.0 and o.grpc_port == 9102
    assert o.ignored == ["v"]


def test_bool_flag_alone_means_true():
    assert parse_args(["--endpoints=1.2.3.4:8000", "--ha-enable-leader-election"]).ha_enable_leader_election


@pytest.mark.parametrize("text,seconds", [("1m30s", 90.0), ("250ms", 0.25), ("3", 3.0), ("1h", 3600.0)])
def test_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_conflicting_sources_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--pool-name=p", "--endpoints=1.2.3.4:80"])
    assert "exactly one of" in capsys.readouterr().err
