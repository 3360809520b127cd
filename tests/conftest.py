"""Fixtures: a tiny random-weight Falcon with a real byte-level BPE tokenizer, built once per session."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from transformers import FalconForCausalLM

import trickle
from trickle.config import Settings
from trickle.generation import AsyncEngine, EngineConfig, LoadedModel, load_model
from trickle.generation.loader import build_demo_model

ROOT = Path(__file__).resolve().parent.parent
if ROOT not in {Path(part).resolve() for part in trickle.__path__}:
    # Another copy of trickle (an installed release) would be the one under test.
    raise pytest.UsageError(
        f"`import trickle` finds {list(trickle.__path__)}, not this checkout: `pip install -e .` here"
    )

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny"
    build_demo_model(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), dtype="float32", device="cpu")


class ScriptedHead(torch.nn.Module):
    """An output head that makes the tiny model generate a fixed token script after a prompt of known
    length: a test double for the parts of the pipeline after the model (detokenizing, stop strings,
    SSE), so a test chooses exactly which tokens come out, split characters included."""

    def __init__(self, head: torch.nn.Module, script: list[int], prompt_len: int) -> None:
        super().__init__()
        self.head, self.prompt_len = head, prompt_len
        self.script = torch.tensor(script)
        self.weight = head.weight
        self.positions = torch.zeros(1, 1, dtype=torch.long)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)  # [N, V] or [N, 1, V]: one position a row
        index = (self.positions[:, -1] + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        rows = logits.view(-1, logits.shape[-1])
        rows[torch.arange(rows.shape[0]), self.script[index]] += 1e4
        return logits


def scripted_model(model_dir: Path, script: list[int], prompt_len: int) -> FalconForCausalLM:
    model = FalconForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = ScriptedHead(model.get_output_embeddings(), script, prompt_len)
    model.set_output_embeddings(head)

    def remember_positions(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        head.positions = kwargs["position_ids"]

    model.base_model.register_forward_pre_hook(remember_positions, with_kwargs=True)
    return model


def fail_step(monkeypatch: pytest.MonkeyPatch, engine: AsyncEngine, at_call: int, message: str) -> None:
    """Make the engine's `at_call`-th runner step raise RuntimeError(message) when it is launched; the
    others run normally."""
    runner = engine.engine.runner
    real_launch = runner.launch
    calls = {"n": 0}

    def failing_launch(batch: Any, meanwhile: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == at_call:
            raise RuntimeError(message)
        return real_launch(batch, meanwhile)

    monkeypatch.setattr(runner, "launch", failing_launch)


@contextlib.asynccontextmanager
async def app_url(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """The app served by a real AppRunner on a free loopback port: its URL."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def bias_head(engine: AsyncEngine, tokens: list[int], amount: float) -> None:
    """Add `amount` to the logits of `tokens` wherever the engine samples (a model that prefers them)."""
    head = engine.engine.runner.head

    def biased(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        logits[:, tokens] += amount
        return logits

    engine.engine.runner.head = biased  # type: ignore[assignment]


@dataclass
class Prefills:
    """The labels of the requests an engine's steps prefilled: inside the decoding rows' forward
    (`mixed`), in a forward of their own (`apart`), and a chunk of the prompt at a time (`chunked`)."""

    mixed: set[str] = field(default_factory=set)
    apart: set[str] = field(default_factory=set)
    chunked: set[str] = field(default_factory=set)


def record_prefills(engine: AsyncEngine) -> Prefills:
    """Record, step by step, how `engine` prefills each request (by its label)."""
    seen = Prefills()
    runner = engine.engine.runner
    launch = runner.launch

    def recording(batch: Any, meanwhile: Any = None) -> Any:
        seen.mixed.update(seq.label for seq in batch.prefill[: batch.mixed])
        seen.apart.update(seq.label for seq in batch.prefill[batch.mixed :])
        seen.chunked.update(seq.label for seq in batch.prefill if seq.is_partial)
        return launch(batch, meanwhile)

    runner.launch = recording  # type: ignore[method-assign]
    return seen


def make_engine(loaded: LoadedModel, **config: float) -> AsyncEngine:
    defaults = {"max_batch_size": 16, "max_seq_len": 512, "prefill_token_budget": 4096}
    return AsyncEngine(loaded.model, loaded.tokenizer, EngineConfig(**{**defaults, **config}))


@pytest.fixture
async def engine(tiny: LoadedModel) -> AsyncIterator[AsyncEngine]:
    running = make_engine(tiny)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def settings() -> Iterator[Settings]:
    yield Settings(model="test", ping_interval=30.0, max_body_bytes=4096)
