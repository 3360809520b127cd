"""Engine: the thread that owns the model. Each step: drain the inbox, schedule, run, postprocess."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from trickle.generation.messages import AbortRequest, AddRequest, StepReport, TokenLogprobs, TokenOutput
from trickle.generation.runner import Launched, ModelRunner
from trickle.generation.runner.model_runner import token_logprobs
from trickle.generation.scheduler import Scheduler, SchedulerConfig
from trickle.generation.sequence import Sequence, Status
from trickle.generation.structured import Grammars

log = structlog.get_logger("generation.engine")

Message = AddRequest | AbortRequest | None  # None wakes the thread to stop
HEARTBEAT_S = 0.5
Reporter = Callable[[StepReport], None]


@dataclass(frozen=True)
class StepStats:
    """A collected step's figures for its report (see StepReport)."""

    decoded_rows: int = 0
    step_seconds: float = 0.0
    wait_seconds: float = 0.0
    decode_device_seconds: float = 0.0


class Engine:
    """Continuous batching on one thread.

    `submit` and `stop` may be called from any thread; everything else runs on the engine thread. After
    every step that changed anything, `report` is called (on the engine thread) with the step's outputs,
    token ids: text is made where the requests are served (`Streams`), never on this thread. `report`
    must hand them over to their consumers without blocking.
    """

    def __init__(
        self,
        runner: ModelRunner,
        config: SchedulerConfig,
        eos_ids: set[int],
        report: Reporter,
        grammars: Grammars | None = None,
    ) -> None:
        self.runner = runner
        self.grammars = grammars
        self.scheduler = Scheduler(config)
        self.eos_ids = eos_ids
        self.report = report
        self.steps = 0
        self.heartbeat = time.monotonic()
        self._previous_step_end = 0.0
        self._step_stats = StepStats()  # of the last step collected
        self._handoff_seconds = 0.0  # how long the last `report` call took
        self._pending: list[TokenOutput] = []  # the next report's ends
        self._ids: list[str] = []  # and its rows that go on, with their tokens
        self._tokens: list[int] = []
        self._logprobs: dict[str, TokenLogprobs] = {}  # and theirs, where they asked
        self._in_flight: Launched | None = None
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.on_exit: Callable[[], None] = lambda: None
        """Called on the engine thread as it ends, after its last report."""
        self._thread = threading.Thread(target=self._loop, name="trickle-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, message: AddRequest | AbortRequest) -> None:
        self._inbox.put(message)

    def stop(self, timeout: float | None = None) -> None:
        """Finish every request with `shutdown` and join the thread."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("engine thread failed")
            self._pending += self._finish_all(Status.ERROR, "the engine failed")
        else:
            self.flush()
            self._pending += self._finish_all(Status.SHUTDOWN)
        try:
            self._report()
        finally:
            self.on_exit()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self.run_once(block=not (self.scheduler.has_work or self._in_flight))

    def run_once(self, block: bool = False) -> None:
        """One turn of the loop: drain the inbox (waiting for a message if `block`), launch the next step,
        then collect the step launched last turn, so the host's work overlaps the device's."""
        self.heartbeat = time.monotonic()
        changed = self._drain_inbox(block=block)
        for seq in self.scheduler.expire(time.monotonic()):
            self._pending.append(self._final_output(seq))
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.constrained:
            # Rows follow grammars: their next masks need the step in flight's tokens. It is collected
            # once the next step's forward is queued, while the device runs it, before anything samples.
            self._in_flight = self._launch(meanwhile=lambda: self._collect(previous))
        else:
            self._in_flight = self._launch()
            if previous is not None:
                self._collect(previous)
        if changed or previous is not None or self._in_flight is not None or self._pending:
            self._report()

    def flush(self) -> None:
        """Collect the step in flight, if any (used on shutdown and by tests that drive the engine)."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._collect(previous)

    def _drain_inbox(self, block: bool) -> bool:
        try:
            # An idle engine still wakes now and then, so its heartbeat shows it alive.
            message = self._inbox.get(block=block, timeout=HEARTBEAT_S if block else None)
        except queue.Empty:
            return False
        while message is not None:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True
        return True

    def _handle(self, message: AddRequest | AbortRequest) -> None:
        if isinstance(message, AbortRequest):
            stop = message.stop_at is not None
            seq = self.scheduler.abort(message.request_id, Status.FINISHED_STOP if stop else Status.CANCELLED)
            if seq is not None:
                if stop:  # the tokens after the stop string's end are not the request's
                    del seq.output_ids[message.stop_at :]
                self._pending.append(self._final_output(seq))
            return
        seq = Sequence(
            message.request_id,
            message.prompt_ids,
            message.params,
            message.seed,
            arrival_time=message.arrival_time,
            deadline=message.deadline,
            label=message.label,
        )
        spec = message.params.response_format
        if spec is not None:
            try:
                if self.grammars is None:
                    raise RuntimeError("this engine follows no grammars")
                seq.matcher = self.grammars.matcher(spec)
            except Exception as err:  # checked where the request came in: this is not expected
                log.exception("grammar failed", request_id=seq.log_name)
                seq.finish(Status.ERROR, error=f"the response format failed: {type(err).__name__}")
                self._pending.append(self._final_output(seq))
                return
        self.scheduler.add(seq)

    def _launch(self, meanwhile: Callable[[], None] | None = None) -> Launched | None:
        """Schedule and queue the next step. Rows whose token from the step in flight is still unseen
        take it on the device; a row that turns out to have finished with it wastes one row of a step.
        `meanwhile` runs once the step's forward is queued, before it samples (or at once, if there is
        no step)."""
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            log.info("request preempted", request_id=seq.log_name, tokens=seq.num_tokens)
        if batch.is_empty:
            if meanwhile is not None:
                meanwhile()
            return None
        now = time.monotonic()
        for seq in batch.prefill:
            if seq.admitted_time is None or not seq.chunked:  # a chunked prompt: its first admission
                seq.admitted_time = now
        done = False

        def once() -> None:
            nonlocal done
            if meanwhile is not None and not done:
                done = True
                meanwhile()

        try:
            launched = self.runner.launch(batch, once)
        except Exception as err:  # a failed step fails its own rows, never the engine
            once()  # the step in flight is collected all the same
            self._fail(batch.rows, err)
            return None
        for index, seq in enumerate(batch.decode):
            seq.launched += 1
            seq.row_index = index
        partial = []
        for index, seq in enumerate(batch.prefill, len(batch.decode)):
            seq.row_index = index
            if seq.is_partial:  # a chunk of its prompt: no token of its own yet
                partial.append(index)
            else:
                seq.launched += 1
        launched.partial = frozenset(partial)
        return launched

    def _collect(self, launched: Launched) -> None:
        """The step's tokens: rows that go on into the flat lists of the next report, ends into its
        outputs."""
        waited = time.monotonic()
        try:
            tokens = self.runner.collect(launched)
        except Exception as err:
            self._fail(launched.rows, err)
            return
        self.steps += 1
        now = time.monotonic()
        # A decoded row got its previous token when the previous step was collected.
        since = self._previous_step_end if launched.num_decode else now
        self._step_stats = StepStats(
            launched.num_decode, now - since, now - waited, launched.decode_device_seconds
        )
        self.scheduler.pacing.observe(
            launched.num_decode, launched.decode_seconds, launched.prefill_tokens, launched.prefill_seconds
        )
        self._previous_step_end = now
        ids, made = self._ids, self._tokens
        # None unless a row asked for log-probabilities; read as numpy, a row at a time.
        table = None if launched.logprobs is None else launched.logprobs.numpy()
        partial = launched.partial
        for index, (seq, token) in enumerate(zip(launched.rows, tokens, strict=True)):
            if seq.is_finished or (partial and index in partial):  # ended meanwhile, or a prompt's chunk
                continue
            self._append(seq, token, now)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
            logprobs = None
            if table is not None and seq.params.logprobs is not None:
                logprobs = token_logprobs(table[index], token, seq.params.logprobs)
            if seq.is_finished:
                self._pending.append(self._final_output(seq, token, logprobs))
            else:
                ids.append(seq.request_id)
                made.append(token)
                if logprobs is not None:
                    self._logprobs[seq.request_id] = logprobs

    def _fail(self, rows: list[Sequence], err: Exception) -> None:
        # Called from an `except` block: the traceback goes with the log line.
        log.exception("engine step failed", request_ids=[seq.log_name for seq in rows])
        for seq in rows:
            self.scheduler.forget(seq)
            if not seq.is_finished:
                seq.finish(Status.ERROR, error=f"generation failed: {type(err).__name__}")
                self._pending.append(self._final_output(seq))

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_ids.append(token)
        params = seq.params
        if token in self.eos_ids and not params.ignore_eos:
            seq.finish(Status.FINISHED_EOS)
        elif (
            params.stop_token_ids
            and token in params.stop_token_ids
            and seq.num_completion_tokens > params.min_new_tokens
        ):
            seq.finish(Status.FINISHED_STOP)
        elif seq.num_completion_tokens >= params.max_new_tokens:
            seq.finish(Status.FINISHED_LENGTH)

    def _final_output(
        self, seq: Sequence, token: int | None = None, logprobs: TokenLogprobs | None = None
    ) -> TokenOutput:
        log.info(
            "request finished",
            request_id=seq.log_name,
            finish_reason=seq.finish_reason,
            completion_tokens=seq.num_completion_tokens,
        )
        return TokenOutput(
            seq.request_id,
            token,
            logprobs,
            finish_reason=seq.finish_reason,
            error=seq.error,
            usage={
                "prompt_tokens": seq.num_prompt_tokens,
                "completion_tokens": seq.num_completion_tokens,
                "cached_tokens": seq.cached_prompt_tokens,
            },
            timings=seq.timings_ms(),
        )

    def _finish_all(self, status: Status, error: str | None = None) -> list[TokenOutput]:
        outputs = []
        in_flight = self._in_flight.rows if self._in_flight is not None else []
        for seq in {id(seq): seq for seq in [*self.scheduler, *in_flight]}.values():
            if not seq.is_finished:
                seq.finish(status, error)
                outputs.append(self._final_output(seq))
        return outputs

    def _report(self) -> None:
        stats, self._step_stats = self._step_stats, StepStats()
        ends, ids, tokens, logprobs = self._pending, self._ids, self._tokens, self._logprobs
        self._pending, self._ids, self._tokens, self._logprobs = [], [], [], {}
        started = time.perf_counter()
        self.report(
            StepReport(
                self.steps,
                ends,
                self.scheduler.num_running,
                len(self.scheduler.waiting),
                decoded_rows=stats.decoded_rows,
                step_seconds=stats.step_seconds,
                wait_seconds=stats.wait_seconds,
                decode_device_seconds=stats.decode_device_seconds,
                handoff_seconds=self._handoff_seconds,
                kv_tokens=self.scheduler.kv_tokens,
                prefix_queries=self.scheduler.prefix_queries,
                prefix_hits=self.scheduler.prefix_hits,
                preemptions=self.scheduler.preemptions,
                ids=ids,
                tokens=tokens,
                logprobs=logprobs,
            )
        )
        self._handoff_seconds = time.perf_counter() - started
