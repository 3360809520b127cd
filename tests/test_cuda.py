"""CUDA-only paths, skipped without a GPU: the step graphs (decode, sampling, prefill) over the paged
KV cache against stock transformers, with and without torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import FalconForCausalLM

from tests.conftest import make_engine
from tests.families import FAMILIES, build
from tests.test_engine import generate_all
from tests.test_families import assert_exact
from trickle.generation import LoadedModel, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_tiny(model_dir: Path) -> LoadedModel:
    return load_model(str(model_dir), dtype="float32", device="cuda")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled graphs"])
async def test_graphs_match_generate_token_for_token(
    cuda_tiny: LoadedModel, model_dir: Path, compile: bool
) -> None:
    """Rows join running ones; decode batches are padded to their graph's size, and the padding rows
    must write only the null block."""
    stock = FalconForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().cuda()
    # Sized: by default the pool takes what GPU memory is left, and tests run several engines.
    engine = make_engine(cuda_tiny, max_batch_size=16, kv_cache_tokens=16 * 512, compile=compile)
    await generate_all(engine, stock, cuda_tiny)
    runner = engine.engine.runner
    assert runner.use_graphs and any(key[0] == "decode" for key in runner._graphs)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", list(FAMILIES))
async def test_every_family_is_exact_with_cuda_graphs(family: str, tiny: LoadedModel) -> None:
    """The model matrix on the GPU: masks, alibi and the model's own head inside captured graphs."""
    model = build(family, len(tiny.tokenizer), tiny.tokenizer.eos_token_id).cuda()
    await assert_exact(model, tiny.tokenizer)
