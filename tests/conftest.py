"""Fixtures: a tiny random-weight Falcon with a real byte-level BPE tokenizer, built once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import FalconForCausalLM

from config import Settings
from generation import AsyncEngine, EngineConfig, LoadedModel, load_model
from generation.loader import build_demo_model

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny"
    build_demo_model(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), dtype="float32", device="cpu")


class ScriptedFalcon(FalconForCausalLM):
    """The tiny model, made to generate a fixed token script after a prompt of known length.

    A test double for the parts of the pipeline after the model (detokenizing, stop strings, SSE):
    it lets a test choose exactly which tokens are generated, split characters included.
    """

    script: ClassVar[list[int]] = []
    prompt_len = 0

    def forward(self, *, position_ids: torch.Tensor, cache: object = None, **kwargs: Any) -> Any:
        out = super().forward(position_ids=position_ids, cache=cache, **kwargs)
        positions = position_ids
        index = (positions[:, -1] + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        script = torch.tensor(self.script, device=positions.device)
        out.logits[torch.arange(positions.shape[0]), -1, script[index]] += 1e4
        return out


@pytest.fixture(scope="session")
def scripted(model_dir: Path, tiny: LoadedModel) -> ScriptedFalcon:
    return ScriptedFalcon.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_engine(loaded: LoadedModel, **config: int) -> AsyncEngine:
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
