"""Streams: the requests one event loop serves, each turned from the engine's token ids into text.

The engine thread hands over token ids only. Where the HTTP responses are written (the engine's own
process, or an HTTP worker process), `Streams` keeps each live request's incremental detokenizer and
queue: the per-token text work runs beside the socket writes it feeds, never on the engine thread. A
stop string is found here too; the engine hears of it as an abort that names how many tokens count.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer

from trickle.generation.detokenizer import IncrementalDetokenizer
from trickle.generation.messages import AbortRequest, AddRequest, RequestOutput, TokenLogprobs, TokenOutput
from trickle.generation.params import MAX_SEED, SamplingParams
from trickle.generation.resume import Detach, Kept

# The engine's reasons after which the text still held back (an unfinished character, a possible start of
# a stop string) is released: the output ended on its own (`stop` here is a stop token's: a stop string's
# end is handled before). Other ends (cancelled, timeout, shutdown, error) cut it where it was.
FLUSHED = frozenset({"eos", "stop", "length"})


@dataclass(eq=False)
class _Live:
    detokenizer: IncrementalDetokenizer
    queue: asyncio.Queue[RequestOutput]
    tokens: int = 0
    stopped_at: int | None = None
    """Tokens up to the end of the stop string, once one was found; later tokens are not the request's."""
    held: str = ""
    """Text before the stop string, given with the final output once the engine confirms the end."""
    logprobs: list[TokenLogprobs] | None = None
    """Where the request asked for them: the log-probabilities of the tokens counted since the last
    output (they go with the next one)."""
    resumable: bool = False
    """A reader that leaves early detaches it (it runs on, kept) rather than cancelling it."""
    reader: int = 0
    """Which reading of the request this is (a resumed one takes over from the one before)."""


def new_request(
    prompt_ids: list[int],
    params: SamplingParams,
    timeout: float,
    label: str,
    resumable: bool = False,
    credential: str = "",
) -> AddRequest:
    """A request admitted now: an engine key (unique, unguessable, whatever the label), a seed, a
    deadline."""
    seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
    now = time.monotonic()
    return AddRequest(
        uuid.uuid4().hex, prompt_ids, params, seed, now, now + timeout, label, resumable, credential
    )


# Put in an evicted reading's queue after its error: it ends there, without an end (the request goes on,
# read by another connection).
_EVICTED = RequestOutput("", "")
EVICTED_MESSAGE = "another connection reads this stream now (it resumed it)"


class RequestStream:
    """One request's outputs, in order. Closing it before the end cancels the request; reading the
    final output releases it. `request_id` is the engine's key for it, made where it was admitted."""

    def __init__(self, streams: Streams, request_id: str, live: _Live) -> None:
        self.request_id = request_id
        self._streams, self._live = streams, live
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        output = await self._live.queue.get()
        if output is _EVICTED:
            self._finished = True
            raise StopAsyncIteration
        if output.finished:
            self._finished = True
            self._streams.release(self.request_id, finished=True, live=self._live)
        return output

    async def aclose(self) -> None:
        self._streams.release(self.request_id, finished=self._finished, live=self._live)


class Streams:
    """The live requests of one event loop. `send` carries requests and aborts to the engine (its inbox,
    or the link to the engine's process); `feed` takes each step's outputs on the event loop."""

    def __init__(
        self, tokenizer: Tokenizer, send: Callable[[AddRequest | AbortRequest | Detach], None]
    ) -> None:
        self.tokenizer = tokenizer
        self._send = send
        self._live: dict[str, _Live] = {}
        self.on_release: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._live)

    def open(self, add: AddRequest) -> RequestStream:
        stream = self._track(add)
        self._send(add)
        return stream

    def _track(self, add: AddRequest, reader: int = 0) -> RequestStream:
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        detokenizer = IncrementalDetokenizer(self.tokenizer, add.prompt_ids, add.params.stop)
        live = _Live(detokenizer, queue, resumable=add.resumable, reader=reader)
        self._live[add.request_id] = live
        if add.params.logprobs is not None:
            live.logprobs = []
        return RequestStream(self, add.request_id, live)

    def replay(self, kept: Kept) -> RequestStream:
        """A kept request read again from its first event: its outputs rebuilt from its tokens (the same
        ones, in the same order, as its first reading), then its live ones as steps come. A reading of
        it here already is evicted first."""
        earlier = self._live.get(kept.add.request_id)
        if earlier is not None:
            self.evict(kept.add.request_id, earlier.reader)
        stream = self._track(kept.add, kept.reader)
        request_id, end = kept.add.request_id, kept.end
        going = kept.tokens[:-1] if end is not None and end.token is not None else kept.tokens
        entries = kept.logprobs if kept.add.params.logprobs is not None else []
        for place, token in enumerate(going):
            scores = {request_id: entries[place]} if place < len(entries) else None
            self.feed_tokens([request_id], [token], scores)
        if end is not None:
            self.feed([end])
        return stream

    def release(self, request_id: str, finished: bool, live: _Live | None = None) -> None:
        """Forget a request (where `live`, only that reading of it); one its reader left before the end
        is aborted, or detached where it is resumable."""
        current = self._live.get(request_id)
        if current is None or (live is not None and current is not live):
            return
        del self._live[request_id]
        if not finished:
            self._send(Detach(request_id, current.reader) if current.resumable else AbortRequest(request_id))
        self.on_release()

    def evict(self, request_id: str, reader: int) -> None:
        """End the `reader`th reading of a request with an error and no end: another connection reads it
        now. Nothing is sent: the request goes on."""
        live = self._live.get(request_id)
        if live is None or live.reader != reader:
            return
        del self._live[request_id]
        live.queue.put_nowait(RequestOutput(request_id, "", error=EVICTED_MESSAGE))
        live.queue.put_nowait(_EVICTED)
        self.on_release()

    def end_all(self, finish_reason: str, error: str | None = None) -> None:
        """End every live request as if the engine had (its engine is gone)."""
        ends = [TokenOutput(i, None, finish_reason=finish_reason, error=error) for i in list(self._live)]
        self.feed(ends)

    def feed_tokens(
        self, ids: list[str], tokens: list[int], logprobs: dict[str, TokenLogprobs] | None = None
    ) -> None:
        """A step's tokens of requests that go on (`ids[i]` got `tokens[i]`), and the log-probabilities
        of those that asked for them."""
        live_of = self._live.get
        for request_id, token in zip(ids, tokens, strict=True):
            live = live_of(request_id)
            if live is None or live.stopped_at is not None:
                continue
            if logprobs and live.logprobs is not None and request_id in logprobs:
                live.logprobs.append(logprobs[request_id])
            text = self._step(live, token)
            if live.stopped_at is not None:
                self._send(AbortRequest(request_id, stop_at=live.stopped_at))
            elif text:
                live.queue.put_nowait(RequestOutput(request_id, text, self._take_logprobs(live)))

    def feed(self, ends: Iterable[TokenOutput]) -> None:
        """Outputs that end requests. One ended after its stop string ends `stop`, with the text before
        the stop and the tokens up to it."""
        for end in ends:
            live = self._live.get(end.request_id)
            if live is None:
                continue
            text = ""
            if live.stopped_at is None and end.token is not None:
                if end.logprobs is not None and live.logprobs is not None:
                    live.logprobs.append(end.logprobs)
                text = self._step(live, end.token)
            logprobs = self._take_logprobs(live)
            if live.stopped_at is not None:
                usage = {**end.usage, "completion_tokens": live.stopped_at}
                output = RequestOutput(
                    end.request_id,
                    live.held,
                    logprobs,
                    finish_reason="stop",
                    usage=usage,
                    timings=end.timings,
                )
            else:
                if end.finish_reason in FLUSHED:
                    text += live.detokenizer.flush()
                output = RequestOutput(
                    end.request_id,
                    text,
                    logprobs,
                    finish_reason=end.finish_reason,
                    error=end.error,
                    usage=end.usage,
                    timings=end.timings,
                )
            live.queue.put_nowait(output)

    @staticmethod
    def _take_logprobs(live: _Live) -> list[TokenLogprobs] | None:
        """The log-probabilities waiting for the request's next output (None where it asked for none)."""
        taken = live.logprobs
        if taken is not None:
            live.logprobs = []
        return taken

    @staticmethod
    def _step(live: _Live, token: int) -> str:
        """The text `token` releases. At a stop string, the text before it is held (for the end) and
        `stopped_at` says how many tokens count."""
        live.tokens += 1
        text = live.detokenizer.step(token)
        if live.detokenizer.stopped:
            live.stopped_at, live.held = live.tokens, text
            return ""
        return text
