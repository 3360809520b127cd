"""Incremental, UTF-8-safe detokenizing per row, with stop strings that hold back as little as possible."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens fed to the decoder as context, so the first generated token decodes as it would in
# the middle of the text (SentencePiece-style tokenizers drop a leading space otherwise).
CONTEXT_TOKENS = 6


def _held_tail(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalDetokenizer:
    """Turns one row's token ids into text deltas.

    `DecodeStream` keeps only a small window of ids and returns nothing while the text ends in an
    unfinished UTF-8 sequence, so each token costs O(1) however long the output grows. Text that could
    still turn into a stop string is held back and released once it cannot. When the row ends, `flush`
    gives what is still held, the unfinished tail decoded as the tokenizer decodes it (with U+FFFD), so
    that the whole text is the tokenizer's decoding of the whole output.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        self._stream = DecodeStream(ids=context, skip_special_tokens=True)
        self._stops = tuple(stop)
        self._held = ""
        # The ids of the last piece of text (the prompt's tail before any) and those fed since, still
        # undecoded: what `flush` decodes.
        self._settled: list[int] = context
        self._pending: list[int] = []
        self.stopped = False

    def step(self, token_id: int) -> str:
        """Feed one generated token; return the text that is now safe to emit (may be empty)."""
        piece = self._stream.step(self._tokenizer, token_id)
        self._pending.append(token_id)
        if not piece:
            return ""
        self._settled, self._pending = self._pending, []
        return self._release(self._held + piece)

    def _release(self, text: str) -> str:
        if not self._stops:
            self._held = ""
            return text
        cut = self._first_stop(text)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = _held_tail(text, self._stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Everything not yet emitted, once the row has ended for a reason other than a stop string: the
        held-back text, and the tail that never made whole characters, decoded with U+FFFD."""
        text = self._held + self._undecoded()
        self._held, self._pending = "", []
        cut = self._first_stop(text)
        return text if cut < 0 else text[:cut]

    def _first_stop(self, text: str) -> int:
        """Where the first stop string in `text` begins, or -1."""
        return min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)

    def _undecoded(self) -> str:
        if not self._pending:
            return ""
        known = self._tokenizer.decode(self._settled, skip_special_tokens=True)
        whole = self._tokenizer.decode(self._settled + self._pending, skip_special_tokens=True)
        if whole.startswith(known):
            return whole[len(known) :]
        # The prompt's last token left a character unfinished and the output finished it.
        return self._tokenizer.decode(self._pending, skip_special_tokens=True)
