"""Anthropic Messages bodies (/v1/messages) as the chat messages vLLM renders for them.

vLLM serves /v1/messages by converting the body to a chat request
(entrypoints/anthropic/serving.py `_build_messages`) and applying the model's chat template
to it; its /v1/messages/render answers the token ids of that prompt. The conversion here is
its text part, shared by token-producer's inProcess backend, the vllm backend's `legacy`
Messages mode (the reference's conversion to a chat body for /v1/chat/completions/render)
and the simulator:

- `system`: a string becomes a system message as it is; an array of blocks, the text of its
  non-empty text blocks joined with nothing between them (a block starting with
  `x-anthropic-billing-header`, Claude Code's per-request attribution, is left out, as vLLM
  does), a system message only when that text is not empty;
- each message: string content as it is; an array of blocks, its non-empty text blocks: one
  becomes the content string, more become text parts; a user message left with no content
  is dropped, an assistant one kept (empty).

Images, tool use and results, thinking blocks and `tools` are not converted here: they raise
TokenizerError (the vllm backend's native mode renders them on the model server)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tokens_local import TokenizerError

BILLING_HEADER = "x-anthropic-billing-header"
ROLES = ("user", "assistant")


def _text_blocks(blocks: list[Any], where: str, skip_other: bool) -> list[str]:
    """The non-empty texts of an array of content blocks. Raises TokenizerError."""
    out = []
    for j, block in enumerate(blocks):
        if not isinstance(block, Mapping):
            raise TokenizerError(f"{where}[{j}]: a content block must be an object")
        kind = block.get("type")
        if kind != "text":
            if skip_other:
                continue
            raise TokenizerError(f"{where}[{j}]: {str(kind)[:64]!r} blocks are not tokenized in process (text "
                                 "blocks only); the vllm backend's native Messages rendering takes them")
        text = block.get("text")
        if not isinstance(text, str):
            raise TokenizerError(f"{where}[{j}].text must be a string")
        if text:
            out.append(text)
    return out


def messages_to_chat(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages vLLM makes of a Messages body. Raises TokenizerError naming the field."""
    if body.get("tools"):
        raise TokenizerError("tools are rendered by vLLM only")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        if system:
            out.append({"role": "system", "content": system})
    elif isinstance(system, list):
        text = "".join(t for t in _text_blocks(system, "system", skip_other=True) if not t.startswith(BILLING_HEADER))
        if text:
            out.append({"role": "system", "content": text})
    elif system is not None:
        raise TokenizerError("system must be a string or an array of content blocks")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise TokenizerError(f"messages[{i}].role must be 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise TokenizerError(f"messages[{i}].content must be a string or an array of content blocks")
        texts = _text_blocks(content, f"messages[{i}].content", skip_other=False)
        msg: dict[str, Any] = {"role": role}
        if len(texts) == 1:
            msg["content"] = texts[0]
        elif texts:
            msg["content"] = [{"type": "text", "text": t} for t in texts]
        if texts or role != "user":
            out.append(msg)
    if not out:
        raise TokenizerError("messages: no content to render")
    return out
