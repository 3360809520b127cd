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
    still turn into a stop string is held back and released once it cannot.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=list(prompt_ids[-CONTEXT_TOKENS:]), skip_special_tokens=True)
        self._stops = tuple(stop)
        self._held = ""
        self.stopped = False

    def step(self, token_id: int) -> str:
        """Feed one generated token; return the text that is now safe to emit (may be empty)."""
        piece = self._stream.step(self._tokenizer, token_id)
        if not piece:
            return ""
        text = self._held + piece
        if not self._stops:
            self._held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = _held_tail(text, self._stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once the row has ended for a reason other than a stop string."""
        text, self._held = self._held, ""
        return text
