"""Falcon: the fixes the engine applies to stock transformers Falcon models.

Falcon does not use transformers' attention interface, so three of its habits are fixed here, on the
module instances, with the same arithmetic:

- it picks the shared key and value heads with a list index (`[..., [-2], :]`), which copies a host
  tensor to the GPU on every call: a CUDA graph cannot capture that;
- with one key/value head (multi-query, Falcon-7B) it hands SDPA keys of shape [B, 1, L, D] beside
  queries of [B, 71, 1, D]; SDPA then falls back to a kernel that copies the keys out to every head,
  which makes the decode step's attention cost grow with 71 x the KV cache; and a prefill with a mask
  runs the unfused float32 attention;
- with grouped keys and values (Falcon-40B and later) it copies them out to every query head before
  they are cached: 16x the KV memory for 128 query heads over 8.

Its linear layers (`FalconLinear`) compute `input @ weight.T`, which without a bias is `nn.Linear`'s
product: those become plain `nn.Linear`, so what the engine does with linear layers
(`generation.linear`) applies to them too.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.falcon.modeling_falcon import (
    FalconAttention,
    FalconLinear,
    apply_rotary_pos_emb,
)

from trickle.generation.kv.attention import context, decode_layer, prefill_layer


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
    if position_embeddings is None:
        raise ValueError("rotary Falcon attention needs position embeddings")
    query, key, value = _split_rotate(
        self.query_key_value(hidden_states), self.num_heads, *position_embeddings
    )
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    plain_causal = getattr(layer_past, "plain_causal", False)
    out = _attention(query, key, value, self.layer_idx, plain_causal, attention_mask)
    return self.dense(out), None


def _split_rotate(
    qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qkv: [B, T, (heads + 2) * D]; the last two heads are the one key and value -> query [B, H, T, D],
    # key and value [B, 1, T, D], rotary applied
    batch, length, width = qkv.shape
    qkv = qkv.view(batch, length, heads + 2, width // (heads + 2))
    # The query heads and the key head, side by side, rotated as one tensor (transformers' own rotary,
    # given no second tensor): compiled, one kernel where the query's and key's shapes made two.
    rotating = qkv[:, :, :-1].transpose(1, 2)
    rotated, _ = apply_rotary_pos_emb(rotating, rotating[:, :0], cos, sin)
    query, key = rotated[:, :-1], rotated[:, -1:]
    return query, key, qkv[:, :, -1:].transpose(1, 2)


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_idx: int,
    plain_causal: bool,
    attention_mask: Any,
) -> torch.Tensor:
    """Multi-query attention: query [B, H, T, D], key and value [B, 1, L, D] -> [B, T, H * D]. In a
    paged decode step, key and value are the new ones, [B, 1, D], which `decode_layer` stores; in a
    prefill past cached positions the cache has stored them and `prefill_layer` reads the blocks."""
    batch, heads, length, dim = query.shape
    if key.dim() == 3:  # a paged decode step's new keys, [B, 1, D]
        out = decode_layer(query, key, value, dim**-0.5)
        return out.reshape(batch, length, heads * dim)
    if context.prefill is not None:  # a prefill past cached positions: the pools hold the new keys
        return prefill_layer(query, dim**-0.5).reshape(batch, length, heads * dim)
    context.saw(layer_idx)
    if length == 1:
        # One query per head and a single key head: let the heads stand in for query positions, so
        # the keys are read once, not once per head. mask [B, 1, 1, L] broadcasts over them.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key, value, attn_mask=attention_mask)
    elif plain_causal:
        # Every row starts at position 0 and is right-padded: plain causal attention is exact for
        # every real token, and without a mask SDPA can take its fused kernels.
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(
            1, 2
        )
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, enable_gqa=True
        ).transpose(1, 2)
    # out: [B, T, H, D] -> [B, T, H * D]
    return out.reshape(batch, length, heads * dim)


def _grouped_query_attention(
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
    """The grouped-query layout (Falcon-40B and later) with only its key/value heads in the cache: the
    stock code copies them out to every query head before caching (16x the KV memory for 128 heads over
    8), and picks them with list indices, which a CUDA graph cannot capture. Same arithmetic."""
    if position_embeddings is None:
        raise ValueError("rotary Falcon attention needs position embeddings")
    batch, length, _ = hidden_states.shape
    kv_heads = self.num_kv_heads or self.num_heads
    groups = self.num_heads // kv_heads
    # [B, T, kv_heads, groups + 2, D]: each key/value head follows the query heads it serves
    qkv = self.query_key_value(hidden_states).view(batch, length, kv_heads, groups + 2, self.head_dim)
    query = qkv[:, :, :, :-2].flatten(2, 3).transpose(1, 2)
    key, value = qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    if key.dim() == 3:  # a paged decode step's new keys, [B, KV, D]
        out = decode_layer(query, key, value, self.head_dim**-0.5).transpose(1, 2)
    elif context.prefill is not None:  # a prefill past cached positions
        out = prefill_layer(query, self.head_dim**-0.5).transpose(1, 2)
    else:
        context.saw(self.layer_idx)
        causal = getattr(layer_past, "plain_causal", False)
        mask = None if causal else attention_mask
        out = F.scaled_dot_product_attention(query, key, value, mask, is_causal=causal, enable_gqa=True)
    return self.dense(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)), None


def adapt(model: PreTrainedModel) -> None:
    """Apply the adaptations that fit this model; other models are left as they are."""
    for module in model.modules():
        if type(module) is FalconLinear and module.bias is None:
            module.__class__ = torch.nn.Linear
        if not isinstance(module, FalconAttention) or module.config.alibi:
            continue
        if module.new_decoder_architecture:
            module.forward = types.MethodType(_grouped_query_attention, module)  # type: ignore[method-assign]
        elif module.multi_query:
            module.forward = types.MethodType(_multi_query_attention, module)  # type: ignore[method-assign]
