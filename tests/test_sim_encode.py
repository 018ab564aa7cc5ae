"""The simulator's encode stage against the reference sidecar's encoder fan-out
(pkg/sidecar/proxy/connector_ec_common.go: mmTypes, URL dedup, buildEncoderRequest,
PrimeSingleTokenRequest, the header's comma list)."""

from simulator.encoder import encoder_request, encoder_targets, item_hash, mm_items, placeholder_messages


def img(url):
    return {"type": "image_url", "image_url": {"url": url}}


BODY = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 50,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "compare"}, img("a"), img("b"), img("a"),
                                                  {"type": "input_audio", "input_audio": {"data": "..."}}]}]}


def test_multimodal_parts_in_order_with_urls_deduplicated():
    assert mm_items(BODY) == [img("a"), img("b"), {"type": "input_audio", "input_audio": {"data": "..."}}]
    assert mm_items({"messages": [{"role": "user", "content": "text only"}]}) == []
    assert mm_items({"messages": "junk"}) == [] and mm_items({}) == []


def test_the_encoder_request_carries_one_part_one_token_unstreamed():
    out = encoder_request(BODY, img("b"))
    assert out["messages"] == [{"role": "user", "content": [img("b")]}]
    assert out["max_tokens"] == 1 and out["max_completion_tokens"] == 1 and out["stream"] is False
    assert "stream_options" not in out and BODY["stream"] is True  # the original is untouched


def test_header_values_and_placeholders():
    assert encoder_targets(["10.0.0.1:8000, 10.0.0.2:8000,"]) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert encoder_targets(["a:1", "b:2"]) == ["a:1", "b:2"]
    text = placeholder_messages(BODY["messages"])[1]["content"]
    assert [p["text"] for p in text] == ["compare", "<image_url>", "<image_url>", "<image_url>", "<input_audio>"]
    assert item_hash(img("a")) == item_hash({"image_url": {"url": "a"}, "type": "image_url"}) != item_hash(img("b"))
