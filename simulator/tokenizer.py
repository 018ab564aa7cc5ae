"""A deterministic, dependency-free tokenizer and a fixed (Llama-3 style) chat template.

Text is split left to right into pieces (special tokens, a word with its leading space,
up to 3 digits, up to 4 punctuation marks, whitespace); a word longer than 6 characters
is cut into 5-character chunks until the rest fits in 6. Each piece's id is a stable CRC32 of its text folded into the
vocabulary, so the same text always gives the same ids in every process, and English
text comes out at about 4 characters per token. Because pieces never span a word
boundary, two prompts with the same leading text share their leading token ids, which is
what makes prefix caching behave as with a real model."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from epp.requestcontrol.producers.tokens_local import LocalTokenizer, TokenizerError, content_text

VOCAB_SIZE = 128256  # Llama 3's vocabulary size
SPECIAL_TOKENS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}
_FIRST_SPECIAL = 128000
# One regex does all the cutting (in C): a word of up to 6 characters (with its leading
# space) is one piece; a longer one is cut into 5-character chunks until the rest fits.
_PIECE = re.compile(
    "|".join(re.escape(s) for s in SPECIAL_TOKENS)
    + r"| ?[A-Za-z]{1,5}(?![A-Za-z])|[A-Za-z]{6}(?![A-Za-z])| [A-Za-z]{4}|[A-Za-z]{5}"
    + r"| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]{1,4}|\s+(?!\S)|\s+"
)

# Short words, each exactly one token (<= 6 characters with its leading space): the
# vocabulary that generated text is drawn from.
_OUTPUT_WORDS = (
    " the of and to in is it you that he was for on are as with his they at be this"
    " have from or one had by but not what all were we when your can said there use an"
    " each she do how will up out many then them so some her make like him into time has"
    " look two more go see no way day did get come made may part new sun sky sea red big"
    " old far end run set cat dog map car box cup key top low ice own art law war act"
).split(" ")[1:]


@lru_cache(maxsize=1 << 17)
def _piece_id(piece: str) -> int:
    special = SPECIAL_TOKENS.get(piece)
    return special if special is not None else zlib.crc32(piece.encode()) % _FIRST_SPECIAL


def pieces(text: str) -> list[str]:
    """The text cut into token pieces (joining them gives the text back)."""
    return _PIECE.findall(text)


def encode(text: str) -> list[int]:
    return list(map(_piece_id, _PIECE.findall(text)))


def encode_with_pieces(text: str) -> tuple[list[int], list[str]]:
    ps = _PIECE.findall(text)
    return list(map(_piece_id, ps)), ps


OUTPUT_VOCAB: tuple[tuple[int, str], ...] = tuple((_piece_id(w), w) for w in (" " + w for w in _OUTPUT_WORDS))
_ID_TO_TEXT = {i: t for i, t in OUTPUT_VOCAB} | {v: k for k, v in SPECIAL_TOKENS.items()}


def decode_token(token_id: int) -> str:
    """Text of a generated token (ids outside the output vocabulary decode to "")."""
    return _ID_TO_TEXT.get(token_id, "")


def _content_text(content: Any) -> str:
    """OpenAI content parts: the text parts, joined as they are. Raises ValueError."""
    return content_text(content, sep="")


def apply_chat_template(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Llama-3 chat format. Raises ValueError naming the bad field."""
    out = ["<|begin_of_text|>"]
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        try:
            text = _content_text(msg.get("content"))
        except ValueError as e:
            raise ValueError(f"messages[{i}].content: {e}") from None
        out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


# --------------------------------------------------------------------------- the server's prompt tokenizer
class BuiltinTokenizer:
    """The prompt tokenizer of a server started without --tokenizer: the functions above."""

    vocab_size = VOCAB_SIZE

    def completion(self, prompt: str, add_special_tokens: bool = True,
                   echo: bool = True) -> tuple[list[int], list[str]]:
        """Token ids of the prompt and, if `echo`, its pieces (else [])."""
        return encode_with_pieces(prompt) if echo else (encode(prompt), [])

    def chat(self, messages: list, add_generation_prompt: bool = True,
             echo: bool = True) -> tuple[list[int], list[str]]:
        """Token ids of the rendered conversation and, if `echo`, the pieces of its last
        message (else [])."""
        ids = encode(apply_chat_template(messages, add_generation_prompt))
        return ids, pieces(_content_text(messages[-1].get("content"))) if echo else []


class FileTokenizer:
    """A model's tokenizer.json and chat template (`epp sim --tokenizer DIR`), through the
    picker's own in-process backend, so the server's prompt ids (and so its KV blocks and
    events) are exactly the ids the picker computes."""

    def __init__(self, directory: str) -> None:
        self.local = LocalTokenizer.load(directory)
        self.local.require_chat_template()
        self.vocab_size = self.local.vocab_size

    def _pieces(self, text: str) -> list[str]:
        enc = self.local.tokenizer.encode(text, add_special_tokens=False)
        return [text[s:e] for s, e in enc.offsets]

    # The pieces (echo mode only) cost a second pass of the tokenizer: done only if `echo`.
    def completion(self, prompt: str, add_special_tokens: bool = True,
                   echo: bool = True) -> tuple[list[int], list[str]]:
        return self.local.encode(prompt, add_special_tokens), self._pieces(prompt) if echo else []

    def chat(self, messages: list, add_generation_prompt: bool = True,
             echo: bool = True) -> tuple[list[int], list[str]]:
        try:
            ids = self.local.encode(self.local.render_chat(messages, add_generation_prompt))
        except TokenizerError as e:
            raise ValueError(str(e)) from None
        return ids, self._pieces(content_text(messages[-1].get("content"))) if echo else []


@lru_cache(maxsize=8)
def prompt_tokenizer(directory: str | None) -> BuiltinTokenizer | FileTokenizer:
    """The server's prompt tokenizer: the model directory's, or the built-in one. Loaded once
    per directory and shared by the servers of a process (`epp sim --replicas n` would
    otherwise load tokenizer.json n + 1 times, each copy with its own piece cache)."""
    return FileTokenizer(directory) if directory else BuiltinTokenizer()
