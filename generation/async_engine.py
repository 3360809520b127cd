"""AsyncEngine: the asyncio side of the engine. Submit a request, iterate its text deltas, cancel on exit."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerFast

from generation.engine import Engine
from generation.messages import AbortRequest, AddRequest, RequestOutput, StepReport
from generation.params import MAX_SEED, SamplingParams
from generation.runner import ModelRunner, RunnerConfig
from generation.scheduler import SchedulerConfig


class RequestError(ValueError):
    """A request the engine cannot serve as asked; `field` names the parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class EngineUnavailableError(RuntimeError):
    """The engine thread is not running (not started yet, stopped, or dead)."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64
    max_seq_len: int = 2048
    prefill_token_budget: int = 4096
    memory_utilization: float = 0.9
    cuda_graphs: bool = True
    compile: bool = False


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids |= set(configured) if isinstance(configured, list) else {configured}
    return ids


class AsyncEngine:
    """Owns the engine thread and one asyncio queue per live request.

    The engine thread hands each step's outputs to the event loop with one `call_soon_threadsafe`;
    `generate` reads its queue and, when its caller goes away before the end, sends an abort so that
    the row leaves the batch at the next step.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: EngineConfig
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        eos_ids = _eos_ids(model, tokenizer)
        runner = ModelRunner(
            model,
            RunnerConfig(
                max_batch_size=config.max_batch_size,
                max_seq_len=config.max_seq_len,
                prefill_token_budget=config.prefill_token_budget,
                memory_utilization=config.memory_utilization,
                cuda_graphs=config.cuda_graphs,
                compile=config.compile,
            ),
            eos_ids,
        )
        scheduler_config = SchedulerConfig(runner.num_slots, config.prefill_token_budget)
        self.engine = Engine(runner, tokenizer.backend_tokenizer, scheduler_config, eos_ids, self._on_report)
        self.num_running = 0
        self.num_waiting = 0
        self.steps = 0
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reported = asyncio.Event()

    async def start(self) -> None:
        """Capture the decode graphs (on a GPU), then start the engine thread."""
        await asyncio.to_thread(self.engine.runner.warm_up)
        self._loop = asyncio.get_running_loop()
        self.engine.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    @property
    def ready(self) -> bool:
        return self._loop is not None and self.engine.is_alive()

    def encode_prompt(self, prompt: str, cutoff_len: int, params: SamplingParams) -> list[int]:
        """Tokenize and keep the most recent `cutoff_len` tokens; check the request fits a KV slot."""
        ids = self.tokenizer.encode(prompt)[-cutoff_len:]
        if not ids:
            raise RequestError("prompt", "the prompt encodes to no tokens")
        room = self.config.max_seq_len - len(ids)
        if params.max_new_tokens > room:
            raise RequestError(
                "max_new_tokens",
                f"max_new_tokens ({params.max_new_tokens}) plus the prompt's {len(ids)} tokens exceeds "
                f"the server's max_seq_len ({self.config.max_seq_len})",
            )
        return ids

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's outputs as the engine produces them; the last one has a finish_reason."""
        if not self.ready:
            raise EngineUnavailableError("the engine is not running")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        seed = params.seed if params.seed is not None else random.randint(0, MAX_SEED)
        self.engine.submit(AddRequest(request_id, prompt_ids, params, seed, time.monotonic()))
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            del self._queues[request_id]
            if not finished:
                self.engine.submit(AbortRequest(request_id))

    async def wait_until(self, predicate: Callable[[AsyncEngine], bool]) -> None:
        """Wait, without polling, until `predicate(self)` holds after some engine report."""
        while not predicate(self):
            await self._reported.wait()

    def _on_report(self, report: StepReport) -> None:
        # Engine thread: one hand-over per step, whatever the number of rows.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, report)

    def _deliver(self, report: StepReport) -> None:
        for output in report.outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        self.num_running, self.num_waiting, self.steps = report.num_running, report.num_waiting, report.step
        self._reported.set()
        self._reported = asyncio.Event()
