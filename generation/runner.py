"""ModelRunner: prefill, batched decode and sampling; the only code that launches GPU work."""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from generation.kv_cache import SlotKVCache
from generation.sampler import SamplingTensors, sample_rows
from generation.scheduler import ScheduledBatch
from generation.sequence import Sequence

# Attention reads the cache up to a multiple of this, so the decode step's shapes change rarely.
KV_LEN_BUCKET = 64


def _cache_argument(model: PreTrainedModel) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.x; pass whichever this version takes.
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class ModelRunner:
    """Runs one engine step on the model: moves slots, prefills newcomers, decodes the running rows,
    and samples every row, returning the new tokens with one device-to-host copy."""

    def __init__(self, model: PreTrainedModel, max_batch_size: int, max_seq_len: int, eos_ids: set[int]):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_seq_len = max_seq_len
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.cache = SlotKVCache(max_batch_size, max_seq_len)
        self._cache_arg = _cache_argument(model)
        # seen[slot, token]: the token is in the row's prompt or output (for the repetition penalty)
        self.seen = torch.zeros(max_batch_size, self.vocab_size, dtype=torch.bool, device=self.device)
        self.eos_mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.eos_mask[[i for i in eos_ids if i < self.vocab_size]] = True
        self._min_value = torch.finfo(self.dtype).min

    @torch.inference_mode()
    def step(self, batch: ScheduledBatch) -> list[int]:
        """Run the batch; return one sampled token per row, in `batch.rows` order."""
        for src, dst in batch.moves:
            self.cache.move(src, dst)
            self.seen[dst] = self.seen[src]
        logits = [self._decode(batch.decode)] if batch.decode else []
        logits += [self._prefill(seq) for seq in batch.prefill]
        rows = batch.rows
        params = SamplingTensors.from_rows(rows, self.device)
        tokens = sample_rows(torch.cat(logits), params, self.seen[: len(rows)], self.eos_mask)
        self.seen[torch.arange(len(rows), device=self.device), tokens] = True
        return tokens.tolist()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_arg: self.cache},
        )
        return out.logits[:, -1, :]

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        # One row at a time: each prompt fills its own slot from position 0.
        length = seq.num_prompt_tokens
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device)[None, :]
        mask = torch.full((length, length), self._min_value, dtype=self.dtype, device=self.device).triu(1)
        self.seen[seq.slot] = False
        self.seen[seq.slot, ids[0]] = True
        self.cache.for_prefill(seq.slot)
        return self._forward(ids, positions, mask[None, None])

    def _decode(self, rows: list[Sequence]) -> torch.Tensor:
        # Row b feeds its last token at position num_tokens - 1 and attends to 0..num_tokens-1.
        host = torch.tensor([[seq.last_token, seq.num_tokens - 1] for seq in rows], dtype=torch.long)
        ids, positions = host.to(self.device, non_blocking=True).unbind(1)
        longest = max(seq.num_tokens for seq in rows)
        kv_len = min(-(-longest // KV_LEN_BUCKET) * KV_LEN_BUCKET, self.max_seq_len)
        visible = torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~visible, self._min_value
        )
        self.cache.for_decode(positions, kv_len)
        return self._forward(ids[:, None], positions[:, None], mask[:, None, None, :])
