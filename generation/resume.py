"""Resumable streams: what the engine's process keeps of a `/stream` request so that a client that lost
its connection can come back (`GET /stream/{stream_id}` with `Last-Event-ID`) and read on.

The process that runs the engine keeps, for each resumable request, its prompt, its parameters and every
token it made (and their log-probabilities where asked), and its end once it has one. Whoever serves the
reconnect (any HTTP worker) rebuilds the events from them: a request's events are a pure function of its
tokens (one token a step, one event a token that releases text, then the end), so the replay has the
same ids and text as the first reading. Nothing torch here.

A request whose client went away is orphaned, not cancelled: it runs on, its tokens kept, for the grace
period; then, if nobody came back, it is cancelled. A finished request is kept for the grace period from
its end (or from its client leaving, whichever is later). At most `limit` requests, and `token_limit`
tokens (prompts and outputs, as they were when the request ended or was left), are kept once finished or
orphaned; past either, the oldest go first (an orphan among them is cancelled).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from trickle.generation.messages import AddRequest, TokenLogprobs, TokenOutput

KEPT_LIMIT = 4096
KEPT_TOKENS = 1 << 22  # ~150 MB at worst: a kept token is a Python int in a list


def credential_of(key: str | None) -> str:
    """What a stream remembers of the API key that opened it (a digest: never the key itself)."""
    return "" if not key else hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Detach:
    """Streams -> engine side: the client of a resumable request went away; keep it running for the
    grace period. `reader` numbers the reading that left (a later reader's takes precedence)."""

    request_id: str
    reader: int = 0


@dataclass(frozen=True)
class Evict:
    """Host -> worker: another connection reads this request now; end the `reader`th reading (without an
    end: the request goes on there)."""

    request_id: str
    reader: int


@dataclass(frozen=True)
class Reattach:
    """Worker -> host: a client asks to read a kept request again (answered by a Reattached of the same
    query)."""

    query: int
    request_id: str
    credential: str


@dataclass(frozen=True)
class Reattached:
    """Host -> worker: the kept request (its tokens so far; the live ones follow as steps come), or why
    not: `missing` (no such stream, expired, or not this client's)."""

    query: int
    kept: Kept | None
    refusal: str = ""


@dataclass(frozen=True)
class Cancel:
    """Worker -> host: a client cancels its kept request now (answered by a Cancelled of the same
    query)."""

    query: int
    request_id: str
    credential: str


@dataclass(frozen=True)
class Cancelled:
    """Host -> worker: whether there was such a request of that client's to cancel."""

    query: int
    found: bool


@dataclass
class Kept:
    add: AddRequest
    credential: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    end: TokenOutput | None = None
    attached: bool = True
    """A client reads it now."""
    reader: int = 0
    """The number of the reading that follows it live: each reattach of a running request takes it over
    with the next number."""


class Keeper:
    """The resumable requests of one engine: their tokens as steps come, their expiry. `abort` cancels
    a request in the engine (an orphan nobody came back for)."""

    def __init__(
        self,
        grace: float,
        abort: Callable[[str], None],
        limit: int = KEPT_LIMIT,
        token_limit: int = KEPT_TOKENS,
    ) -> None:
        self.grace, self.abort, self.limit, self.token_limit = grace, abort, limit, token_limit
        self._kept: dict[str, Kept] = {}
        self._idle: OrderedDict[str, asyncio.TimerHandle] = OrderedDict()  # ended or orphaned: expiring
        self._sizes: dict[str, int] = {}  # each idle request's tokens when it went idle
        self.idle_tokens = 0
        self._orphaned: set[str] = set()  # running, with nobody reading them

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._kept

    @property
    def orphans(self) -> int:
        """Requests that still run with nobody reading them (they hold rows all the same)."""
        return len(self._orphaned)

    def add(self, add: AddRequest, credential: str) -> None:
        self._kept[add.request_id] = Kept(add, credential)

    def record(self, ids: list[str], tokens: list[int], logprobs: dict[str, TokenLogprobs]) -> None:
        """A step's tokens (the requests that go on); a per-token lookup, for every live request."""
        kept = self._kept
        if not kept:
            return
        for request_id, token in zip(ids, tokens, strict=True):
            entry = kept.get(request_id)
            if entry is not None:
                entry.tokens.append(token)
                if logprobs and request_id in logprobs:
                    entry.logprobs.append(logprobs[request_id])

    def ended(self, outputs: list[TokenOutput]) -> None:
        for output in outputs:
            entry = self._kept.get(output.request_id)
            if entry is None:
                continue
            if output.token is not None:
                entry.tokens.append(output.token)
                if output.logprobs is not None:
                    entry.logprobs.append(output.logprobs)
            entry.end = output
            self._orphaned.discard(output.request_id)
            self._expire_later(output.request_id)

    def detach(self, request_id: str, reader: int = 0) -> bool:
        """The `reader`th reading left; False (nothing done) where a later reading has taken over."""
        entry = self._kept.get(request_id)
        if entry is None or reader != entry.reader:
            return False
        entry.attached = False
        if entry.end is None:
            self._orphaned.add(request_id)
        self._expire_later(request_id)
        return True

    def reattach(self, request_id: str, credential: str) -> tuple[Kept | None, str]:
        """The kept request for its client to read again, or (None, why not). A running one is taken
        over: its reader number goes up, and `taken` says another connection still read it (it must be
        evicted: the client came back before the server saw its old connection go, or reads it twice)."""
        entry = self._kept.get(request_id)
        if entry is None or entry.credential != credential:
            return None, "missing"
        if entry.end is not None:  # finished: only ever replayed, by as many readers as come
            return entry, ""
        taken = "taken" if entry.attached else ""
        entry.reader += 1
        entry.attached = True
        self._orphaned.discard(request_id)
        self._unidle(request_id)  # running again with a reader: it no longer expires
        return entry, taken

    def cancel(self, request_id: str, credential: str) -> bool:
        """Cancel a kept request now (its reader, if it has one, gets its `cancelled` end); whether there
        was one of this client's. A finished one stays kept, for replays."""
        entry = self._kept.get(request_id)
        if entry is None or entry.credential != credential:
            return False
        if entry.end is None:
            self.abort(request_id)
        return True

    def forget(self, request_id: str) -> None:
        self._orphaned.discard(request_id)
        self._unidle(request_id)
        self._kept.pop(request_id, None)

    def _unidle(self, request_id: str) -> None:
        timer = self._idle.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        self.idle_tokens -= self._sizes.pop(request_id, 0)

    def _expire_later(self, request_id: str) -> None:
        self._unidle(request_id)
        self._idle[request_id] = asyncio.get_running_loop().call_later(self.grace, self._expire, request_id)
        entry = self._kept[request_id]
        self._sizes[request_id] = size = len(entry.add.prompt_ids) + len(entry.tokens)
        self.idle_tokens += size
        while len(self._idle) > self.limit or self.idle_tokens > self.token_limit:
            oldest = next(iter(self._idle))
            self._expire(oldest)

    def _expire(self, request_id: str) -> None:
        entry = self._kept.get(request_id)
        self.forget(request_id)
        if entry is not None and entry.end is None and not entry.attached:
            self.abort(request_id)  # an orphan nobody came back for
