"""In-process tokenization with the `tokenizers` library: the model's tokenizer.json and the
chat template of its tokenizer_config.json, read once at start-up from a model directory
or a Hugging Face hub cache (models--org--name/snapshots/<rev>/); nothing is fetched.

Chat templates are Jinja programs; jinja2 is not a dependency, so the template is matched
by its text against the templates built in here (ChatML as vLLM's
examples/template_chatml.jinja, and Meta Llama 3 Instruct's) and rendered by the
equivalent Python; any other template is refused at start-up, naming the alternative
(the vllm backend renders any template on the model server's side).

A rendered prompt is encoded piecewise: cut at the tokenizer's added tokens (which the
library itself extracts before its normalizer and pre-tokenizer see the text), each piece
encoded alone, the long ones kept in a bounded cache, so a system prompt repeated across
requests is encoded once. Whether piecewise encoding equals whole-text encoding depends on
the tokenizer (e.g. a Metaspace "first" prefix does not); it is checked on a probe at
load time and, when it does not hold, every prompt is encoded whole."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# the piece cache's bounds: total token ids held, and pieces shorter than this are encoded each time
PIECE_CACHE_TOKENS = 1 << 20
PIECE_CACHE_MIN_CHARS = 256
# an uncached piece at least this long is encoded off the event loop before the cycle (warm)
OFFLOAD_MIN_CHARS = 2048


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or a request it cannot render (message says why)."""


# --------------------------------------------------------------------------- locating the files
def hf_hub_cache() -> Path:
    """Where Hugging Face keeps downloaded models (its own environment variables, in its order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def find_tokenizer_dir(path: str = "", model: str = "", hub_cache: str = "") -> Path | None:
    """The directory holding tokenizer.json: `path` itself (a directory or the file), else
    the model `org/name` in the hub cache (the snapshot its refs/main names, or the newest
    one holding the file). None when there is none."""
    if path:
        p = Path(path).expanduser()
        if p.is_file() and p.name == TOKENIZER_FILE:
            return p.parent
        return p if (p / TOKENIZER_FILE).is_file() else None
    if not model:
        return None
    repo = Path(hub_cache).expanduser() if hub_cache else hf_hub_cache()
    repo = repo / ("models--" + model.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        d = snapshots / ref.read_text().strip()
        if (d / TOKENIZER_FILE).is_file():
            return d
    found = sorted((d for d in snapshots.glob("*") if (d / TOKENIZER_FILE).is_file()),
                   key=lambda d: d.stat().st_mtime, reverse=True) if snapshots.is_dir() else []
    return found[0] if found else None


# --------------------------------------------------------------------------- chat templates
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}"
    "{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

Messages = Sequence[tuple[str, str]]  # (role, content text)


def _chatml(messages: Messages, add_generation_prompt: bool, bos: str) -> str:
    out = []
    last = len(messages) - 1
    for i, (role, content) in enumerate(messages):
        out.append(f"<|im_start|>{role}\n{content}")
        if i < last or add_generation_prompt:
            out.append("<|im_end|>\n")
    if add_generation_prompt and messages[-1][0] != "assistant":
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _llama3(messages: Messages, add_generation_prompt: bool, bos: str) -> str:
    out = [bos]
    out += [f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>" for role, content in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


TEMPLATES: dict[str, Callable[[Messages, bool, str], str]] = {
    CHATML_TEMPLATE: _chatml, LLAMA3_TEMPLATE: _llama3}
TEMPLATE_NAMES = {CHATML_TEMPLATE: "chatml", LLAMA3_TEMPLATE: "llama3"}


def content_text(content: Any, sep: str = "\n") -> str:
    """A message's content as vLLM's "string" content format gives it to the template:
    a string as is, a list of text parts joined by newlines (`sep`). Raises TokenizerError."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TokenizerError("only text content parts ({'type': 'text', 'text': str}) can be tokenized")
            texts.append(part["text"])
        return sep.join(texts)
    raise TokenizerError("message content must be a string or a list of text parts")


def chat_messages(messages: Any) -> list[tuple[str, str]]:
    """(role, text) of each message of a chat body. Raises TokenizerError naming the bad field."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m["role"]:
            raise TokenizerError(f"messages[{i}] needs a non-empty string role")
        try:
            out.append((m["role"], content_text(m.get("content"))))
        except TokenizerError as e:
            raise TokenizerError(f"messages[{i}].content: {e}") from None
    return out


def _special_text(value: Any) -> str:
    if isinstance(value, Mapping):  # {"content": "<s>", "lstrip": ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


# --------------------------------------------------------------------------- the caches
K = TypeVar("K", str, bytes)
V = TypeVar("V", list[int], tuple[int, ...])


class IdsCache(Generic[K, V]):
    """LRU of key -> token ids, bounded by the total ids it holds and by `max_entries`
    (the piece cache here, the vllm backend's RenderCache). An empty key is never kept."""

    def __init__(self, max_tokens: int, max_entries: int = sys.maxsize) -> None:
        self.max_tokens, self.max_entries = max_tokens, max_entries
        self.tokens = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        ids = self._items.get(key)
        if ids is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return ids

    def put(self, key: K, ids: V) -> None:
        if not key or key in self._items or len(ids) > self.max_tokens:
            return
        self._items[key] = ids
        self.tokens += len(ids)
        while len(self._items) > self.max_entries or self.tokens > self.max_tokens:
            _, old = self._items.popitem(last=False)
            self.tokens -= len(old)


class PieceCache(IdsCache[str, list[int]]):
    """Piece text -> token ids, bounded by the total token ids it holds."""

    def __init__(self, max_tokens: int = PIECE_CACHE_TOKENS) -> None:
        super().__init__(max_tokens)


# --------------------------------------------------------------------------- the tokenizer
class LocalTokenizer:
    """One model's tokenizer and chat template, loaded from a directory."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any], source: str = "",
                 cache_tokens: int = PIECE_CACHE_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.source = source
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        self.template = template.strip() if isinstance(template, str) else ""
        self._render = TEMPLATES.get(self.template)
        self.template_name = TEMPLATE_NAMES.get(self.template, "")
        self.bos_token = _special_text(config.get("bos_token"))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, added)) + ")").split if added else None
        self._added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.cache = PieceCache(cache_tokens)
        self.piecewise = self._split is not None and self._piecewise_holds()
        self._specials_prefix = self._special_prefix()

    @classmethod
    def load(cls, directory: str | Path, cache_tokens: int = PIECE_CACHE_TOKENS) -> LocalTokenizer:
        d = Path(directory)
        try:
            tok = Tokenizer.from_file(str(d / TOKENIZER_FILE))
        except Exception as e:  # the library raises its own Exception types for bad files
            raise TokenizerError(f"{d / TOKENIZER_FILE}: cannot load: {e}") from None
        config: Any = {}
        if (d / CONFIG_FILE).is_file():
            try:
                config = json.loads((d / CONFIG_FILE).read_text())
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{d / CONFIG_FILE}: {e}") from None
        if not isinstance(config, Mapping):
            raise TokenizerError(f"{d / CONFIG_FILE}: must be a JSON object")
        if (d / "chat_template.jinja").is_file():  # newer layouts keep the template in its own file
            config = {**config, "chat_template": (d / "chat_template.jinja").read_text()}
        return cls(tok, config, str(d), cache_tokens)

    def require_chat_template(self) -> None:
        """Raise unless chat requests can be rendered here (start-up check)."""
        if self._render is None:
            what = "has no chat_template" if not self.template else "has a chat template this build cannot render"
            raise TokenizerError(
                f"{self.source or 'tokenizer'}: {what} (built in: {', '.join(TEMPLATE_NAMES.values())}, matched by "
                "their exact text; jinja2 is not a dependency); use the vllm backend to render it on the model server")

    # ------------------------------------------------------------------ encoding
    def _encode_whole(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_pieces(self, text: str) -> list[int]:
        out: list[int] = []
        added, cache, encode = self._added, self.cache, self._encode_whole
        for piece in self._split(text):  # type: ignore[misc]
            if not piece:
                continue
            special = added.get(piece)
            if special is not None:
                out.append(special)
            elif len(piece) < PIECE_CACHE_MIN_CHARS:
                out += encode(piece)
            else:
                ids = cache.get(piece)
                if ids is None:
                    ids = encode(piece)
                    cache.put(piece, ids)
                out += ids
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, as `tokenizer.encode(text, add_special_tokens)` gives them."""
        if not self.piecewise:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._encode_pieces(text)
        if add_special_tokens:
            if self._specials_prefix is None:
                return self.tokenizer.encode(text, add_special_tokens=True).ids
            return self._specials_prefix + ids
        return ids

    def _piecewise_holds(self) -> bool:
        probe = "Hello  world.\n " + "".join(f"{t} a\n\n{t}b " for t in self._added) + " end\n"
        return self._encode_pieces(probe) == self._encode_whole(probe)

    def _special_prefix(self) -> list[int] | None:
        """What the post-processor adds, when it only prepends (e.g. a BOS); None otherwise."""
        probe = "Hello world"
        plain = self._encode_whole(probe)
        full = self.tokenizer.encode(probe, add_special_tokens=True).ids
        n = len(full) - len(plain)
        return full[:n] if n >= 0 and full[n:] == plain else None

    # ------------------------------------------------------------------ requests
    def render_chat(self, messages: Any, add_generation_prompt: bool = True) -> str:
        self.require_chat_template()
        return self._render(chat_messages(messages), add_generation_prompt, self.bos_token)  # type: ignore[misc]

    def prompt(self, kind: str, body: Mapping[str, Any]) -> tuple[str, bool] | None:
        """The text vLLM tokenizes for a request body and whether it adds special tokens:
        chat (template applied, as /v1/chat/completions/render), Anthropic messages (converted
        to chat, as /v1/messages/render) or completions with a text prompt (as
        /v1/completions/render). None for other APIs. Raises TokenizerError."""
        if kind == "chat":
            if body.get("continue_final_message") or body.get("chat_template") or body.get("tools"):
                raise TokenizerError("continue_final_message, chat_template and tools are rendered by vLLM only")
            agp = body.get("add_generation_prompt", True)
            text = self.render_chat(body.get("messages"), add_generation_prompt=bool(agp))
            return text, bool(body.get("add_special_tokens", False))
        if kind == "messages":  # as vLLM's /v1/messages: converted to chat, the template applied
            from .tokens_messages import messages_to_chat  # (that module imports this one)

            return self.render_chat(messages_to_chat(body)), False
        if kind == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                return prompt, bool(body.get("add_special_tokens", True))
        return None

    def tokenize_body(self, kind: str, body: Mapping[str, Any]) -> list[int] | None:
        """The prompt token ids vLLM would make of a request body (see prompt)."""
        prompt = self.prompt(kind, body)
        return self.encode(*prompt) if prompt is not None else None

    async def warm(self, kind: str, body: Mapping[str, Any]) -> tuple[str, bool] | None:
        """The body's prompt (see prompt), its long pieces not cached yet encoded off the
        event loop (the library's async_encode runs in its own threads), so that `encode`
        of the returned prompt finds them cached. Raises TokenizerError."""
        prompt = self.prompt(kind, body)
        if prompt is None or not self.piecewise:
            return prompt
        for piece in self._split(prompt[0]):  # type: ignore[misc]
            if len(piece) >= OFFLOAD_MIN_CHARS and piece not in self.cache and piece not in self._added:
                encode = getattr(self.tokenizer, "async_encode", None)
                enc = await (encode(piece, add_special_tokens=False) if encode is not None else
                             asyncio.to_thread(self.tokenizer.encode, piece, add_special_tokens=False))
                self.cache.put(piece, enc.ids)
        return prompt

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
