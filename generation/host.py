"""EngineHost: the engine in its own process, serving the requests of HTTP worker processes over their
links (the worker's side, the links and the messages are in generation/remote.py)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from trickle.generation.async_engine import EngineCore
from trickle.generation.engine_config import EngineConfig
from trickle.generation.messages import AbortRequest, AddRequest, StepReport
from trickle.generation.remote import Ready, State, Step, WorkerLink
from trickle.generation.resume import Cancel, Cancelled, Detach, Evict, Reattach, Reattached

log = structlog.get_logger("generation.remote")


class EngineHost(EngineCore):
    """The engine in its own process, serving the requests of HTTP workers over their links."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: EngineConfig
    ) -> None:
        super().__init__(model, tokenizer, config)
        self._owner: dict[str, WorkerLink] = {}
        self.workers: list[WorkerLink] = []
        """The connected workers (the process that spawns them keeps this list)."""

    @property
    def live(self) -> int:
        return len(self._owner) + self.keeper.orphans

    def ready_message(self) -> Ready:
        return Ready(
            self.tokenizer,
            self.config.max_seq_len,
            self.config.request_timeout,
            self.capacity,
        )

    def state(self) -> State:
        return State(
            None, self.unavailable, self.num_running, self.num_waiting, self.live, self.retry_after()
        )

    def engine_ended(self) -> None:
        self.broadcast()  # the workers hear that new requests are refused

    async def refuse_new(self, timeout: float) -> None:
        """Tell the workers, then wait (up to `timeout` seconds) until each has answered that it refuses
        new requests: the requests a worker sent before its answer reach the engine before it, and are
        served as every other live one."""
        self.draining = True
        self.broadcast()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.wait_until(lambda host: all(worker.refusing for worker in host.workers)), timeout
            )

    def refusing(self, worker: WorkerLink) -> None:
        """A worker refuses new requests from now on (it saw the drain, or the engine's end)."""
        worker.refusing = True
        self._notify()

    def take(
        self, worker: WorkerLink, message: AddRequest | AbortRequest | Detach | Reattach | Cancel
    ) -> None:
        """A worker's request, abort or detach into the engine's inbox, or a reattach answered."""
        if isinstance(message, Reattach):
            self._reattach(worker, message)
            return
        if isinstance(message, Cancel):
            worker.link.send(
                Cancelled(message.query, self.keeper.cancel(message.request_id, message.credential))
            )
            return
        if isinstance(message, Detach):  # its client went away: kept, read by nobody, for a while
            applied = self.keeper.detach(message.request_id, message.reader)
            # A reading another connection has taken over leaves nothing to undo.
            if (applied or message.request_id not in self.keeper) and self._owner.get(
                message.request_id
            ) is worker:
                del self._owner[message.request_id]
            return
        if isinstance(message, AddRequest):
            self._owner[message.request_id] = worker
            if message.resumable:
                self.keeper.add(message, message.credential)
        elif message.stop_at is None:  # the client went away: no output will be read
            self._owner.pop(message.request_id, None)
        self.engine.submit(message)

    def _reattach(self, worker: WorkerLink, message: Reattach) -> None:
        kept, refusal = self.keeper.reattach(message.request_id, message.credential)
        if kept is not None and kept.end is None:
            earlier = self._owner.get(message.request_id)
            if refusal == "taken" and earlier is not None:  # that reading ends there (an error, no end)
                earlier.link.send(Evict(message.request_id, kept.reader - 1))
            self._owner[message.request_id] = worker  # its next tokens go to the worker that reads it
        # Before any later step frame on this link: the worker tracks the stream before its tokens come.
        worker.link.send(Reattached(message.query, kept, refusal if kept is None else ""))

    def lost(self, worker: WorkerLink) -> None:
        """A worker is gone: abort every request it held (their rows leave at the engine's next step)."""
        held = [request_id for request_id, owner in self._owner.items() if owner is worker]
        for request_id in held:
            del self._owner[request_id]
            self.engine.submit(AbortRequest(request_id))
        if held:
            log.warning("worker lost with requests in progress", worker=worker.name, aborted=len(held))
        self._notify()

    def deliver_outputs(self, report: StepReport) -> None:
        owner = self._owner
        for request_id, token in zip(report.ids, report.tokens, strict=True):
            worker = owner.get(request_id)
            if worker is not None:
                worker.ids.append(request_id)
                worker.tokens.append(token)
        for request_id, logprobs in report.logprobs.items():
            worker = owner.get(request_id)
            if worker is not None:
                worker.logprobs[request_id] = logprobs
        for output in report.outputs:
            worker = owner.get(output.request_id)
            if worker is not None:
                worker.ends.append(output)
                del owner[output.request_id]
        self.broadcast()

    def broadcast(self) -> None:
        """Every worker's step frame: its outputs (if any) and the state."""
        state = self.state()
        for worker in self.workers:
            worker.link.send(Step(worker.ids, worker.tokens, worker.ends, state, worker.logprobs))
            worker.ids, worker.tokens, worker.ends = [], [], []
            if worker.logprobs:
                worker.logprobs = {}
