"""Extraction of the scheduler's inputs from /metrics pages, and per-engine specs."""

import math

import pytest

from bench.scrape_cost import realistic_vllm_page
from epp.datalayer import DEFAULT_SPECS, find_samples, parse_labels, parse_metrics, specs_from_config
from epp.datalayer.extract import MAX_GPU_BLOCKS, MAX_LABEL_VALUE, LabelCache

VLLM = DEFAULT_SPECS["vllm"]


def test_realistic_vllm_page():
    page = realistic_vllm_page(waiting=5, running=9, kv=0.37, block_size=32, num_gpu_blocks=1234,
                               lora=((1.70e9, "a,b", "c", 4), (1.80e9, "x", "", 3), (1.75e9, "y", "z", 2)))
    assert 35_000 < len(page) < 60_000
    m = parse_metrics(page, VLLM, 12.5)
    assert (m.waiting_queue_size, m.running_requests_size) == (5, 9)
    assert m.kv_cache_usage_percent == pytest.approx(0.37)
    assert (m.block_size, m.num_gpu_blocks) == (32, 1234)
    # The series with the largest value (a timestamp) is the current LoRA state.
    assert m.running_lora_adapters == {"x"} and m.waiting_lora_adapters == frozenset()
    assert m.max_active_models == 3
    assert m.ok and m.update_time == 12.5


def test_several_model_names_sum_queues_and_take_max_kv():
    page = b"\n".join([
        b'vllm:num_requests_waiting{model_name="a",engine="0"} 2.0',
        b'vllm:num_requests_waiting{engine="1",model_name="b"} 3.0',
        b'vllm:num_requests_running{model_name="a"} 4',
        b'vllm:num_requests_running{model_name="b"} 1 1700000000000',  # trailing timestamp
        b'vllm:kv_cache_usage_perc{model_name="a"} 0.25',
        b'vllm:kv_cache_usage_perc{model_name="b"} 0.75',
    ])
    m = parse_metrics(page, VLLM, 1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (5, 5, 0.75)


def test_label_values_with_escapes_braces_and_any_order():
    raw = find_samples(
        b'# HELP vllm:cache_config_info info {block_size="1"}\n'
        b'vllm:cache_config_info{sliding_window="a \\"}\\" b",num_gpu_blocks="77",x="\\\\",block_size="8"} 1.0\n',
        "vllm:cache_config_info")
    assert len(raw) == 1 and raw[0][1] == 1.0
    labels = parse_labels(raw[0][0])
    assert labels == {"sliding_window": 'a "}" b', "num_gpu_blocks": "77", "x": "\\", "block_size": "8"}
    m = parse_metrics(b"\n" + b"vllm:cache_config_info{" + raw[0][0] + b"} 1.0\n", VLLM, 1.0)
    assert (m.block_size, m.num_gpu_blocks) == (8, 77)


def test_help_type_created_and_longer_names_are_not_samples():
    page = (b"# HELP vllm:num_requests_waiting Number of requests waiting.\n"
            b"# TYPE vllm:num_requests_waiting gauge\n"
            b"vllm:num_requests_waiting_by_reason{reason=\"x\"} 99\n"
            b"vllm:num_requests_waiting{model_name=\"m\"} 6\r\n"
            b"vllm:num_requests_waiting_created{model_name=\"m\"} 1.7e9\n")
    assert [v for _, v in find_samples(page, "vllm:num_requests_waiting")] == [6.0]
    assert parse_metrics(page, VLLM, 1.0).waiting_queue_size == 6


def test_first_line_and_unlabelled_series():
    page = b"vllm:num_requests_running 3\nvllm:num_requests_waiting 4"  # no trailing newline
    m = parse_metrics(page, VLLM, 1.0)
    assert (m.running_requests_size, m.waiting_queue_size) == (3, 4)


def test_missing_series_and_nan_leave_defaults_but_ok():
    page = (b'vllm:num_requests_waiting{model_name="m"} NaN\n'
            b'vllm:kv_cache_usage_perc{model_name="m"} NaN\n'
            b'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n')
    m = parse_metrics(page, VLLM, 3.0)
    assert m.ok and m.waiting_queue_size == 0 and m.running_requests_size == 0
    assert m.kv_cache_usage_percent == 0.5  # NaN on the new name: fall back to the old alias
    assert m.block_size is None and m.num_gpu_blocks is None and m.max_active_models == 0
    empty = parse_metrics(b"", VLLM, 3.0)
    assert empty.ok and empty.kv_cache_usage_percent == 0.0


def test_older_vllm_gpu_cache_usage_only():
    page = realistic_vllm_page(kv=0.6, kv_alias=True).replace(b"vllm:kv_cache_usage_perc", b"vllm:other_perc")
    assert parse_metrics(page, VLLM, 1.0).kv_cache_usage_percent == pytest.approx(0.6)


def test_garbage_values_are_skipped():
    page = b'vllm:num_requests_waiting{model_name="m"} abc\nvllm:num_requests_waiting{model_name="n"} 2\n'
    assert parse_metrics(page, VLLM, 1.0).waiting_queue_size == 2
    assert find_samples(b"vllm:x{broken 1\n", "vllm:x") == []


def test_sglang_and_trtllm():
    sglang = (b'sglang:num_queue_reqs{model_name="m"} 7\nsglang:num_running_reqs{model_name="m"} 2\n'
              b'sglang:token_usage{model_name="m"} 0.125\n'
              b'sglang:cache_config_info{num_pages="900",page_size="64",model_name="m"} 1\n')
    m = parse_metrics(sglang, DEFAULT_SPECS["sglang"], 1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (7, 2, 0.125)
    assert (m.block_size, m.num_gpu_blocks) == (64, 900)
    trt = (b"trtllm_num_requests_waiting 1\ntrtllm_num_requests_running 8\ntrtllm_kv_cache_utilization 0.9\n"
           b"trtllm_kv_cache_tokens_per_block 32\ntrtllm_kv_cache_max_blocks 4096\n")
    m = parse_metrics(trt, DEFAULT_SPECS["trtllm-serve"], 1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.block_size, m.num_gpu_blocks) == (1, 8, 32, 4096)
    assert math.isclose(m.kv_cache_usage_percent, 0.9)


def test_specs_from_config_overrides():
    specs = specs_from_config({"vllm": {"waitingQueue": "my:waiting", "kvCacheUsage": "my:kv", "loraInfo": ""},
                               "trtllm-serve": {"numBlocks": "my_blocks"}})
    assert specs["vllm"].waiting_queue == "my:waiting" and specs["vllm"].kv_cache_usage == ("my:kv",)
    assert specs["vllm"].running_requests == "vllm:num_requests_running" and specs["vllm"].lora_info == ""
    assert specs["trtllm-serve"].num_blocks_gauge == "my_blocks"
    assert specs["sglang"] == DEFAULT_SPECS["sglang"]
    page = b"my:waiting 4\nmy:kv 0.2\nvllm:num_requests_waiting 99\n"
    m = parse_metrics(page, specs["vllm"], 1.0)
    assert (m.waiting_queue_size, m.kv_cache_usage_percent) == (4, 0.2)
    assert specs_from_config(None) == DEFAULT_SPECS


@pytest.mark.parametrize("raw,key", [
    ({"tgi": {}}, "engineMetrics.tgi"),
    ({"vllm": {"queue": "x"}}, "engineMetrics.vllm.queue"),
    ({"vllm": {"waitingQueue": 3}}, "engineMetrics.vllm.waitingQueue"),
    ({"vllm": {"waitingQueue": "has space"}}, "engineMetrics.vllm.waitingQueue"),
    ({"vllm": {"runningRequests": ""}}, "engineMetrics.vllm.runningRequests"),
    ({"sglang": ["x"]}, "engineMetrics.sglang"),
    (["vllm"], "engineMetrics"),
])
def test_specs_from_config_errors_name_the_key(raw, key):
    with pytest.raises(ValueError) as e:
        specs_from_config(raw)
    assert str(e.value).startswith(key + ":")


def test_counter_samples_interleaved_with_created_series():
    page = (b"# HELP vllm:prompt_tokens_total Prompt tokens.\n# TYPE vllm:prompt_tokens_total counter\n"
            b'vllm:prompt_tokens_total{model_name="a"} 10\nvllm:prompt_tokens_created{model_name="a"} 1.7e9\n'
            b'vllm:prompt_tokens_total{model_name="b"} 5\nvllm:prompt_tokens_created{model_name="b"} 1.7e9\n'
            b"# HELP vllm:other x\nvllm:other 1\n")
    assert [v for _, v in find_samples(page, "vllm:prompt_tokens_total")] == [10.0, 5.0]


def test_pages_without_comment_lines_are_searched_to_the_end():
    page = b"vllm:num_requests_waiting 1\nfoo 2\nvllm:num_requests_waiting{x=\"1\"} 2\nbar 3\n"
    assert parse_metrics(page, VLLM, 1.0).waiting_queue_size == 3


# ---------------------------------------------------------------------------- hostile values
@pytest.mark.parametrize("blocks", ["-1", "0", "NaN", "inf", "-inf", "1e30", "12abc", str(MAX_GPU_BLOCKS + 1)])
def test_a_bad_block_count_is_missing_never_a_capacity(blocks):
    problems: list = []
    page = b'vllm:cache_config_info{block_size="16",num_gpu_blocks="%s"} 1\n' % blocks.encode()
    m = parse_metrics(page, VLLM, 1.0, problems)
    assert m.ok and m.num_gpu_blocks is None and m.block_size == 16
    assert problems and problems[0][0] == "vllm:cache_config_info{num_gpu_blocks}"
    assert "treated as missing" in problems[0][1]


def test_bad_counts_kv_and_lora_are_missing_and_reported():
    page = (b'vllm:num_requests_waiting{model_name="a"} 1e308\n'
            b'vllm:num_requests_waiting{model_name="b"} 1e308\n'  # each finite, the sum is not
            b'vllm:num_requests_running{model_name="a"} -4\n'
            b'vllm:kv_cache_usage_perc{model_name="a"} 7.5\n'
            b'vllm:cache_config_info{block_size="-16",num_gpu_blocks="100"} 1\n'
            b'vllm:lora_requests_info{running_lora_adapters="x",waiting_lora_adapters="",max_lora="-2"} 5\n')
    problems: list = []
    m = parse_metrics(page, VLLM, 1.0, problems)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == (0, 0, 0.0)
    assert (m.block_size, m.num_gpu_blocks, m.max_active_models) == (None, 100, 0)
    assert m.running_lora_adapters == {"x"}
    assert sorted(s for s, _ in problems) == sorted([
        "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info{block_size}", "vllm:lora_requests_info{max_lora}"])
    for inf in (b"+Inf", b"-Inf", b"1e400"):
        assert parse_metrics(b"vllm:num_requests_waiting " + inf, VLLM, 1.0).waiting_queue_size == 0
    assert parse_metrics(b"vllm:num_requests_waiting 3\nvllm:num_requests_waiting{x=\"y\"} 4", VLLM,
                         1.0).waiting_queue_size == 7  # sane sums still add up


def test_trtllm_gauges_out_of_range_are_missing():
    trt = b"trtllm_kv_cache_tokens_per_block -32\ntrtllm_kv_cache_max_blocks 1e300\n"
    m = parse_metrics(trt, DEFAULT_SPECS["trtllm-serve"], 1.0)
    assert (m.block_size, m.num_gpu_blocks) == (None, None)


def test_label_values_over_the_cap_are_dropped():
    huge = b"a," * (MAX_LABEL_VALUE // 2 + 1)
    labels = parse_labels(b'running_lora_adapters="%s",max_lora="4"' % huge)
    assert labels == {"max_lora": "4"}
    page = b'vllm:lora_requests_info{running_lora_adapters="%s",waiting_lora_adapters="w",max_lora="4"} 1\n' % huge
    m = parse_metrics(page, VLLM, 1.0)
    assert m.running_lora_adapters == frozenset() and m.waiting_lora_adapters == {"w"} and m.max_active_models == 4


def test_label_cache_is_bounded_in_bytes():
    cache = LabelCache(max_bytes=64 << 10, max_text=4 << 10)
    for i in range(2000):  # 2,000 distinct ~3 KB label texts, as a page that changes every scrape
        text = b'max_lora="%d",pad="%s"' % (i, b"x" * 3000)
        assert cache.labels(text)["max_lora"] == str(i)
        assert cache.bytes <= 64 << 10
    assert 0 < len(cache) <= (64 << 10) // 3000
    big = b'max_lora="1",pad="%s"' % (b"y" * (8 << 10))
    before = cache.bytes
    assert cache.labels(big)["max_lora"] == "1" and cache.bytes == before  # over max_text: not cached
    first = b'max_lora="7"'
    cache.labels(first)
    for i in range(10):
        cache.labels(b'pad="%d%s"' % (i, b"z" * 3000))
        cache.labels(first)  # recently used: kept
    assert first in cache._entries
