"""`epp bench` dispatch, flag errors, and the report helpers."""

from __future__ import annotations

import math

import pytest

from bench import cli
from bench.report import machine, table
from bench.strategies import picker_config
from devstack.localstack import ServerCounts, hit_rate, metric_sum


def test_unknown_benchmark_and_help(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "cluster" in capsys.readouterr().out


def test_bad_workload_file_names_the_key(tmp_path, capsys):
    bad = tmp_path / "w.yaml"
    bad.write_text("workload: {type: shared_prefix, num_grups: 2}\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["cluster", "--workload", str(bad), "--no-plots", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "workload.num_grups: unknown key" in capsys.readouterr().err


def test_cluster_command_writes_results(tmp_path, capsys):
    code = cli.main(["cluster", "--servers", "2", "--requests", "40", "--rates", "20", "--groups", "2",
                     "--system-prompt-len", "200", "--output-len", "4", "--strategies", "round-robin,picker",
                     "--out", str(tmp_path), "--name", "t"])
    assert code == 0
    md = (tmp_path / "t.md").read_text()
    assert "Command: `epp bench cluster --servers 2" in md and "nproc" in md
    assert "| round-robin | 20.0 |" in md and "| picker | 20.0 |" in md
    assert (tmp_path / "t_ttft_cdf.png").stat().st_size > 1000
    assert cli.main(["cluster", "--servers", "2", "--requests", "5", "--strategies", "bogus", "--no-plots",
                     "--out", str(tmp_path)]) == 2
    assert "unknown strategy 'bogus'" in capsys.readouterr().err


def test_server_counters_from_a_metrics_page():
    page = ('# TYPE vllm:request_success_total counter\n'
            'vllm:request_success_total{finish_reason="length",model_name="m"} 7.0\n'
            'vllm:request_success_total{finish_reason="stop",model_name="m"} 2.0\n'
            'vllm:request_success_created{finish_reason="stop",model_name="m"} 1.7e9\n'
            'vllm:prefix_cache_hits_total{model_name="m"} 300.0\n')
    assert metric_sum(page, "vllm:request_success_total") == 9.0
    assert metric_sum(page, "vllm:prefix_cache_hits_total") == 300.0
    assert metric_sum(page, "vllm:prefix_cache_queries_total") == 0.0
    d = ServerCounts(10, 300, 400) - ServerCounts(4, 100, 200)
    assert (d.requests, d.prefix_hits, d.prefix_queries) == (6, 200, 200)
    assert hit_rate([d, ServerCounts(0, 0, 200)]) == 0.5
    assert math.isnan(hit_rate([]))


def test_picker_configs():
    assert picker_config("picker") is None
    assert "random-picker" in picker_config("picker-random")
    with pytest.raises(ValueError, match="unknown strategy"):
        picker_config("fancy")
    with pytest.raises(ValueError, match="cannot read config"):
        picker_config("picker:/nonexistent.yaml")


def test_table_and_machine():
    t = table(["a", "b"], [["x", "1"], ["yy", "22"]])
    assert t.splitlines()[0].split() == ["a", "b"] and t.splitlines()[3].split() == ["yy", "22"]
    assert table(["a"], [["1"]], markdown=True) == "| a |\n|---|\n| 1 |"
    assert "nproc" in machine() and "Python" in machine()
