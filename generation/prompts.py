"""Prompts: request text to token ids, sized against the context, on worker threads off the event loop.

Tokenizing a long prompt (or rendering a long chat) takes about a second per megabyte: on the event loop
that froze every stream. The HTTP side hands that work to `Prompts.off_loop`, whose threads the fast
tokenizer releases the interpreter lock in, and refuses a text that cannot fit the context from its length
alone, before any of it is tokenized.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenizers import Encoding
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

TOKENIZE_WORKERS = 2
# Unicode normalization can fold up to four code points into one character (Greek with breathing, accent
# and iota subscript), so behind such a normalizer one token may stand for four times its own length.
NORMALIZER_FOLD = 4
# Parts of a tokenizer that never drop input characters (a pre-tokenizer of `Split` may, with `removed`).
KEEPING_NORMALIZERS = frozenset(
    {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend", "Replace", "ByteLevel", "Sequence"}
)
KEEPING_PRE_TOKENIZERS = frozenset(
    {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts", "Sequence"}
)

Result = TypeVar("Result")


class RequestError(ValueError):
    """A request the engine cannot serve as asked; `field` names the parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _parts(node: Any) -> list[dict[str, Any]]:
    """Every typed part of a serialized tokenizer component (a normalizer, a pre-tokenizer), nested ones
    included."""
    if isinstance(node, dict):
        own = [node] if isinstance(node.get("type"), str) else []
        return own + [part for value in node.values() for part in _parts(value)]
    if isinstance(node, list):
        return [part for value in node for part in _parts(value)]
    return []


def _drops_characters(spec: dict[str, Any]) -> bool:
    normalizers, pre_tokenizers = _parts(spec.get("normalizer")), _parts(spec.get("pre_tokenizer"))
    if not {part["type"] for part in normalizers} <= KEEPING_NORMALIZERS:
        return True
    if not all(_keeps_length(part) for part in normalizers if part["type"] == "Replace"):
        return True
    if not {part["type"] for part in pre_tokenizers} <= KEEPING_PRE_TOKENIZERS:
        return True
    if any(part["type"] == "Split" and part.get("behavior") == "Removed" for part in pre_tokenizers):
        return True
    # A word the model cannot spell becomes one unknown token, however long it is.
    model = spec["model"]
    return model["type"] == "WordPiece" or (bool(model.get("fuse_unk")) and not model.get("byte_fallback"))


def _keeps_length(replace: dict[str, Any]) -> bool:
    """A Replace of a plain string by one at least as long (Llama-2's " " -> "▁"); a regex may shrink."""
    pattern = replace.get("pattern", {}).get("String")
    return isinstance(pattern, str) and len(str(replace.get("content", ""))) >= len(pattern)


def chars_per_token(tokenizer: PreTrainedTokenizerFast) -> int | None:
    """The most input characters one token can stand for, or None where the tokenizer may drop characters
    (then a text's length says nothing about its token count).

    A token's vocabulary string is at least as long as the text it covers (byte-level tokens spell one
    byte a character, sentencepiece ones one character a character), so a text of n characters has at
    least n / longest tokens.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if _drops_characters(spec):
        return None
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return longest * (NORMALIZER_FOLD if spec.get("normalizer") is not None else 1)


def _piece_reader(tokenizer: PreTrainedTokenizerFast) -> Callable[[str], bytes | None]:
    """How a vocabulary piece becomes its bytes under this tokenizer's decoder; None where it cannot
    tell (the token's text's UTF-8 serves then)."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = {part.get("type") for part in decoder.get("decoders", [decoder])}
    if "ByteLevel" in kinds:
        # Byte-level BPE writes each byte as a character (GPT-2's table, as transformers keeps it).
        alphabet = {char: byte for byte, char in bytes_to_unicode().items()}

        def byte_level(piece: str) -> bytes | None:
            if not all(char in alphabet for char in piece):
                return None
            return bytes(alphabet[char] for char in piece)

        return byte_level
    if "ByteFallback" in kinds:  # sentencepiece: <0xHH> pieces are bytes; "▁" is a space

        def byte_fallback(piece: str) -> bytes | None:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()

        return byte_fallback
    return lambda piece: None


class Prompts:
    """Tokenizes request text for one engine. `off_loop` runs any of its methods on its worker threads;
    the rest may be called from any thread."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.chars_per_token = chars_per_token(tokenizer)
        self._pool = ThreadPoolExecutor(TOKENIZE_WORKERS, thread_name_prefix="trickle-tokenize")
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._piece_bytes = _piece_reader(tokenizer)

    async def off_loop(self, work: Callable[..., Result], *args: Any) -> Result:
        """`work(*args)` on a tokenizer thread; the event loop goes on serving meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def token_text(self, token: int) -> str:
        """One token's text on its own, as the tokenizer decodes it (special tokens included; a token
        holding part of a character decodes to U+FFFD). Remembered: log-probabilities name the same
        tokens again and again."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.backend_tokenizer.decode(
                [token], skip_special_tokens=False
            )
        return text

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, a part of a character's included (OpenAI's `bytes`): read
        from its piece for byte-level BPE and byte-fallback vocabularies, else its text's UTF-8.
        Remembered, as `token_text`."""
        raw = self._token_bytes.get(token)
        if raw is None:
            piece = self.tokenizer.backend_tokenizer.id_to_token(token)
            special = token in self.tokenizer.all_special_ids
            read = None if piece is None or special else self._piece_bytes(piece)
            raw = self._token_bytes[token] = read if read is not None else self.token_text(token).encode()
        return raw

    def fewest_tokens(self, chars: int) -> int:
        """A lower bound on the token count of a text of `chars` characters (0 where none is known)."""
        return 0 if self.chars_per_token is None else -(-chars // self.chars_per_token)

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """Tokenize `text` whole. ValueError for text that is not valid Unicode (a lone surrogate, which
        JSON can carry)."""
        return list(self._encoding(text, special_tokens).ids)

    def _encoding(self, text: str, special_tokens: bool = True) -> Encoding:
        # The engine thread needs the interpreter lock for every step, and anything that holds it for
        # long stalls every stream (measured on a 1 MB prompt, holding it in ms: the transformers
        # wrapper's Python lists of offsets, masks and token strings, tens; `Encoding.truncate`, 54;
        # freeing an encoding with offsets, 30). So: the backend tokenizer (the wrapper calls it for the
        # same ids), its batch call (the single one keeps the lock while it works), and the variant that
        # tracks no offsets (0.4 s a megabyte against 0.7, and 1 ms to free).
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError("the text is not valid Unicode (it holds a lone surrogate)") from err
        backend = self.tokenizer.backend_tokenizer
        return backend.encode_batch_fast([text], add_special_tokens=special_tokens)[0]

    def truncated(self, prompt: str, cutoff_len: int, max_new_tokens: int) -> list[int]:
        """The most recent `cutoff_len` tokens of `prompt`, checked to fit the context with
        `max_new_tokens` after them (RequestError naming the field otherwise, before tokenizing where the
        length of the text already tells)."""
        self.check_room(min(cutoff_len, self.fewest_tokens(len(prompt))), max_new_tokens, at_least=True)
        try:
            encoding = self._encoding(prompt)
        except ValueError as err:
            raise RequestError("prompt", str(err)) from err
        ids = list(encoding.ids[-cutoff_len:])
        if not ids:
            raise RequestError("prompt", "the prompt encodes to no tokens")
        self.check_room(len(ids), max_new_tokens)
        return ids

    def check_room(self, prompt_tokens: int, max_new_tokens: int, at_least: bool = False) -> None:
        """RequestError unless a prompt of `prompt_tokens` (`at_least` that many) leaves room for
        `max_new_tokens` in the context."""
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            count = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
            raise RequestError(
                "max_new_tokens",
                f"max_new_tokens ({max_new_tokens}) plus the prompt's {count} tokens exceeds "
                f"the server's max_seq_len ({self.max_seq_len})",
            )
