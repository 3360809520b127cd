"""The asyncio side of the engine: EngineCore (the engine thread and its metrics, on an event loop) and
AsyncEngine (with the requests served in the same process: submit, iterate the text, cancel on exit)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import generate_latest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from trickle.generation.engine import Engine
from trickle.generation.engine_config import EngineConfig, context_length
from trickle.generation.errors import EngineUnavailableError, QueueFullError
from trickle.generation.messages import AbortRequest, AddRequest, StepReport
from trickle.generation.metrics import EngineMetrics
from trickle.generation.params import SamplingParams
from trickle.generation.prompts import Prompts
from trickle.generation.resume import Detach, Keeper
from trickle.generation.runner import ModelRunner
from trickle.generation.scheduler import SchedulerConfig
from trickle.generation.streams import RequestStream, Streams, new_request
from trickle.generation.structured import Grammars

log = structlog.get_logger("generation.engine")

RATE_WINDOW_S = 30.0
DEFAULT_RETRY_AFTER_S = 5
MAX_RETRY_AFTER_S = 120


class FinishRate:
    """When requests finished over the last `window_s` seconds, the ground of Retry-After hints. It holds
    that window only: older entries go as new ones come."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self._clock = window_s, clock
        self._times: collections.deque[float] = collections.deque()

    def record(self) -> None:
        now = self._clock()
        self._times.append(now)
        self._forget_before(now - self.window_s)

    def per_second(self) -> float:
        self._forget_before(self._clock() - self.window_s)
        return len(self._times) / self.window_s

    def __len__(self) -> int:
        return len(self._times)

    def _forget_before(self, start: float) -> None:
        while self._times and self._times[0] < start:
            self._times.popleft()


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids |= set(configured) if isinstance(configured, list) else {configured}
    return ids


class EngineCore:
    """The engine thread and what its process keeps of it: the metrics, the running and waiting counts,
    and how fast requests finish (for Retry-After).

    The engine thread hands each step's outputs to the event loop with one `call_soon_threadsafe`;
    `_deliver` records them (the metrics, and the `keeper`'s resumable requests), then gives the report
    to `deliver_outputs` (the subclass's: its own streams, or the HTTP workers whose requests they are).
    `live` counts the requests held for callers.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: EngineConfig
    ) -> None:
        self.tokenizer = tokenizer
        asked = config.max_seq_len
        self.config = config = config.within(context_length(model.config))
        if config.max_seq_len < asked:
            log.info(
                "max_seq_len cut to the model's context length", asked=asked, max_seq_len=config.max_seq_len
            )
        eos_ids = _eos_ids(model, tokenizer)
        runner = ModelRunner(model, config, eos_ids)
        scheduler_config = SchedulerConfig(
            runner.max_rows,
            config.prefill_token_budget,
            runner.num_blocks,
            config.kv_block_size,
            config.prefix_cache,
            runner.prefill_read_budget,
            runner.prefill_size,
            config.prefill_pacing,
            runner.mixed_tokens,
            runner.mixed_read_limit,
        )
        self.grammars = Grammars(tokenizer, runner.vocab_size, sorted(eos_ids))
        self.engine = Engine(runner, scheduler_config, eos_ids, self._on_report, self.grammars)
        self.engine.on_exit = self._on_exit
        self.num_running = 0
        self.num_waiting = 0
        self.steps = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self.finish_rate = FinishRate()
        self.draining = False
        self.exited = False
        self.metrics = EngineMetrics(self.engine.scheduler.kv_capacity)
        self.keeper = Keeper(self.config.resume_grace, self._abort)

    @property
    def capacity(self) -> int:
        """Requests held at once: every row, and the waiting queue."""
        return self.engine.runner.max_rows + self.config.max_queue

    @property
    def live(self) -> int:
        raise NotImplementedError

    def deliver_outputs(self, report: StepReport) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        """Cancel a request in the engine (an orphan nobody came back for)."""
        self.engine.submit(AbortRequest(request_id))
        self._notify()

    async def start(self) -> None:
        """Run the model once (ModelRunError if it cannot run), capture the decode graphs (on a GPU), then
        start the engine thread."""
        await asyncio.to_thread(self.engine.runner.warm_up)
        self.grammars.prepare_in_background()
        self._loop = asyncio.get_running_loop()
        self.engine.start()

    async def metrics_text(self) -> bytes:
        """The engine's metrics, in Prometheus' text format."""
        return generate_latest(self.metrics.registry)

    def engine_ended(self) -> None:
        """The engine thread has ended (stopped, or failed): new requests are refused from now on."""

    def _on_exit(self) -> None:
        # Engine thread, its last act.
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._ended)

    def _ended(self) -> None:
        self.exited = True
        self.engine_ended()
        self._notify()

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    @property
    def ready(self) -> bool:
        return self._loop is not None and not self.exited and self.engine.is_alive()

    @property
    def unavailable(self) -> str | None:
        """Why new requests are refused now (draining, or no engine thread), or None when they are not."""
        if self.draining:
            return "the server is draining"
        return None if self.ready else "the model is not ready"

    def alive_within(self, seconds: float) -> bool:
        """The engine thread runs and has turned its loop within `seconds` (a hung step has not)."""
        return self.ready and time.monotonic() - self.engine.heartbeat < seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, from the rate at which requests finished lately."""
        rate = self.finish_rate.per_second()
        if not rate:
            return DEFAULT_RETRY_AFTER_S
        waiting = max(0, self.live - self.engine.runner.max_rows)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil((waiting + 1) / rate)))

    async def refuse_new(self, timeout: float) -> None:
        """Refuse new requests from now on: once this returns, none that arrives is taken."""
        self.draining = True

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let the live ones finish for up to `timeout` seconds, then stop the
        engine: whatever is still running ends with finish_reason `shutdown`."""
        deadline = time.monotonic() + timeout
        await self.refuse_new(timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.wait_until(lambda e: not e.live), max(0.0, deadline - time.monotonic())
            )
        await self.stop()

    async def wait_until(self, predicate: Callable[[Any], bool]) -> None:
        """Wait, without polling, until `predicate(self)` holds after an engine report or a released
        request."""
        while not predicate(self):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_report(self, report: StepReport) -> None:
        # Engine thread: one hand-over per step, whatever the number of rows.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, report)

    def _deliver(self, report: StepReport) -> None:
        self.metrics.record_step(report)
        for output in report.outputs:
            if output.finished:
                self.finish_rate.record()
                self.metrics.record_finished(output)
        self.num_running, self.num_waiting, self.steps = report.num_running, report.num_waiting, report.step
        self.keeper.record(report.ids, report.tokens, report.logprobs)
        self.keeper.ended(report.outputs)
        self.deliver_outputs(report)
        self._notify()


class AsyncEngine(EngineCore):
    """The engine with its requests served in the same process: submit a request, iterate its text,
    cancel on exit. `Streams` turns the tokens into text on the event loop."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: EngineConfig
    ) -> None:
        super().__init__(model, tokenizer, config)
        self.prompts = Prompts(tokenizer, self.config.max_seq_len)
        self.streams = Streams(tokenizer.backend_tokenizer, self._send)
        self.streams.on_release = self._notify

    @property
    def live(self) -> int:
        return len(self.streams) + self.keeper.orphans

    def _send(self, message: AddRequest | AbortRequest | Detach) -> None:
        if isinstance(message, Detach):
            self.keeper.detach(message.request_id, message.reader)
            return
        if isinstance(message, AddRequest) and message.resumable:
            self.keeper.add(message, message.credential)
        self.engine.submit(message)

    def deliver_outputs(self, report: StepReport) -> None:
        self.streams.feed_tokens(report.ids, report.tokens, report.logprobs)
        self.streams.feed(report.outputs)

    async def reattach(self, request_id: str, credential: str) -> RequestStream | str:
        """A kept request's stream from its first event (its client came back; a reading of it still
        here ends), or why not: `missing` (generation/resume.py)."""
        kept, refusal = self.keeper.reattach(request_id, credential)
        return refusal if kept is None else self.streams.replay(kept)

    async def cancel(self, request_id: str, credential: str) -> bool:
        """Cancel a kept request of this client's now; whether there was one."""
        return self.keeper.cancel(request_id, credential)

    async def stop(self) -> None:
        await super().stop()
        self.prompts.close()

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        timeout: float | None = None,
        label: str = "",
        resumable: bool = False,
        credential: str = "",
    ) -> RequestStream:
        """Admit a request now and return its stream of outputs (the last one has a finish_reason).

        Raises at once, before anything is streamed: EngineUnavailableError when the engine is not
        running or is draining, QueueFullError when the waiting queue is full. `timeout` (seconds)
        defaults to the engine's request timeout; past it the request ends with `timeout`. `label` (the
        client's request id, say) names the request in logs; it is never a key: two requests with the
        same label are two requests.
        """
        self.check_admissible()
        timeout = self.config.request_timeout if timeout is None else timeout
        return self.streams.open(new_request(prompt_ids, params, timeout, label, resumable, credential))

    def check_admissible(self, count: int = 1) -> None:
        """EngineUnavailableError when the engine is not running or is draining, QueueFullError when the
        waiting queue cannot take `count` more requests: what `generate` would refuse now, asked before
        the work of tokenizing."""
        if self.unavailable is not None:
            raise EngineUnavailableError(self.unavailable)
        if self.live + count > self.capacity:
            raise QueueFullError(self.retry_after())
