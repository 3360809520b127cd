"""Model-specific adaptations the engine applies to stock transformers models.

Falcon does not use transformers' attention interface, so two of its habits are fixed here, on the
module instances, with the same arithmetic:

- it picks the shared key and value heads with a list index (`[..., [-2], :]`), which copies a host
  tensor to the GPU on every call: a CUDA graph cannot capture that;
- with one key/value head (multi-query, Falcon-7B) it hands SDPA keys of shape [B, 1, L, D] beside
  queries of [B, 71, 1, D]; SDPA then falls back to a kernel that copies the keys out to every head,
  which makes the decode step's attention cost grow with 71 x the KV cache; and a prefill with a mask
  runs the unfused float32 attention.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb


def _multi_query_attention(
    self: FalconAttention,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    # hidden_states: [B, T, hidden] -> qkv: [B, T, heads + 2, D]; the last two are the one key and value
    batch, length, _ = hidden_states.shape
    qkv = self.query_key_value(hidden_states).view(batch, length, self.num_heads + 2, self.head_dim)
    query = qkv[:, :, :-2].transpose(1, 2)  # [B, H, T, D]
    key, value = qkv[:, :, -2:-1].transpose(1, 2), qkv[:, :, -1:].transpose(1, 2)  # [B, 1, T, D]
    if position_embeddings is None:
        raise ValueError("rotary Falcon attention needs position embeddings")
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    if length == 1:
        # One query per head and a single key head: let the heads stand in for query positions, so
        # the keys are read once, not once per head. mask [B, 1, 1, L] broadcasts over them.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key, value, attn_mask=attention_mask)
    elif getattr(layer_past, "plain_causal", False):
        # The cache says every row starts at position 0 and is right-padded: plain causal attention is
        # exact for every real token, and without a mask SDPA can take its fused kernels.
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(
            1, 2
        )
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask).transpose(1, 2)
    # out: [B, T, H, D] -> [B, T, H * D]
    return self.dense(out.reshape(batch, length, self.num_heads * self.head_dim)), None


def _split_heads_by_slicing(self: FalconAttention, fused_qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The grouped-query layout (Falcon-40B and later): slices instead of list indices, same values.
    batch, seq_len, _ = fused_qkv.shape
    groups = self.num_heads // (self.config.num_kv_heads or self.num_heads)
    qkv = fused_qkv.view(batch, seq_len, -1, groups + 2, self.head_dim)
    query, key, value = qkv[:, :, :, :-2], qkv[:, :, :, -2:-1], qkv[:, :, :, -1:]
    key, value = torch.broadcast_to(key, query.shape), torch.broadcast_to(value, query.shape)
    return tuple(x.flatten(2, 3) for x in (query, key, value))


def adapt(model: PreTrainedModel) -> None:
    """Apply the adaptations that fit this model; other models are left as they are."""
    for module in model.modules():
        if not isinstance(module, FalconAttention) or module.config.alibi:
            continue
        if module.new_decoder_architecture:
            module._split_heads = types.MethodType(_split_heads_by_slicing, module)  # type: ignore[method-assign]
        elif module.multi_query:
            module.forward = types.MethodType(_multi_query_attention, module)  # type: ignore[method-assign]
