"""Falcon: the fixes the engine applies to stock transformers Falcon models, and the compiled regions of
its multi-query layers.

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
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.falcon.modeling_falcon import (
    FalconAttention,
    FalconDecoderLayer,
    apply_rotary_pos_emb,
)

from trickle.generation.kv.attention import context, paged_decode
from trickle.generation.kv.cache import KVTarget, PagedKVCache, store


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
    out = _attend(query, key, value, layer_past, self.layer_idx, attention_mask)
    return self.dense(out), None


def _split_rotate(
    qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qkv: [B, T, (heads + 2) * D]; the last two heads are the one key and value -> query [B, H, T, D],
    # key and value [B, 1, T, D], rotary applied
    batch, length, width = qkv.shape
    qkv = qkv.view(batch, length, heads + 2, width // (heads + 2))
    query = qkv[:, :, :-2].transpose(1, 2)
    key, value = qkv[:, :, -2:-1].transpose(1, 2), qkv[:, :, -1:].transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    return query, key, value


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer_past: Any,
    layer_idx: int,
    attention_mask: Any,
) -> torch.Tensor:
    """Store the new keys and values and attend; query [B, H, T, D], key and value [B, 1, T, D] ->
    [B, T, H * D]."""
    if layer_past is not None:
        key, value = layer_past.update(key, value, layer_idx)
    return _attention(query, key, value, getattr(layer_past, "plain_causal", False), attention_mask)


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plain_causal: bool, attention_mask: Any
) -> torch.Tensor:
    """Multi-query attention over keys and values already stored: query [B, H, T, D], key and value
    [B, 1, L, D] (or, for a decode step the kernel reads, the cache's pools) -> [B, T, H * D]."""
    batch, heads, length, dim = query.shape
    context.calls += 1
    if key.dim() == 3 and context.decode is not None:
        out = paged_decode(query, key, value, context.decode, dim**-0.5)
    elif length == 1:
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


Norm = tuple[torch.Tensor, torch.Tensor | None, float]  # a LayerNorm's weight, bias and eps


def _layer_inputs(
    hidden: torch.Tensor,
    norm: Norm | None,
    qkv: tuple[torch.Tensor, torch.Tensor | None],
    heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    target: KVTarget | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Falcon layer up to attention: layer norm (`norm` None: `hidden` is normed already), the fused
    query/key/value projection, rotary, and the new keys and values stored in the paged cache's
    `target` (when there is one)."""
    normed = hidden if norm is None else F.layer_norm(hidden, (hidden.shape[-1],), *norm)
    query, key, value = _split_rotate(F.linear(normed, *qkv), heads, cos, sin)
    if target is not None:
        store(target, key, value)
    return normed, query, key, value


def _layer_output(
    residual: torch.Tensor,
    normed: torch.Tensor,
    attention: torch.Tensor,
    dense: tuple[torch.Tensor, torch.Tensor | None],
    up: tuple[torch.Tensor, torch.Tensor | None],
    down: tuple[torch.Tensor, torch.Tensor | None],
    next_norm: Norm | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A parallel-attention Falcon layer after attention: the MLP beside the attention's projection,
    both added to the residual (in transformers' order); and, given the next layer's norm, that layer's
    normed input too, so the residual add and the next layer norm are one kernel."""
    mlp = F.linear(F.gelu(F.linear(normed, *up)), *down)
    hidden = (mlp + F.linear(attention, *dense)) + residual
    if next_norm is None:
        return hidden, None
    return hidden, F.layer_norm(hidden, (hidden.shape[-1],), *next_norm)


def _run_inputs(
    inputs: Callable[..., Any],
    layer: FalconDecoderLayer,
    hidden: torch.Tensor,
    normed: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    target: KVTarget | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_layer_inputs` (or its compiled form) with `layer`'s weights, on its input normed by the layer
    before (`normed`), or else on `hidden`, normed here."""
    attention, norm = layer.self_attention, layer.input_layernorm
    return inputs(
        hidden if normed is None else normed,
        (norm.weight, norm.bias, norm.eps) if normed is None else None,
        (attention.query_key_value.weight, attention.query_key_value.bias),
        attention.num_heads,
        cos,
        sin,
        target,
    )


def _run_output(
    output: Callable[..., Any],
    layer: FalconDecoderLayer,
    next_layer: FalconDecoderLayer | None,
    residual: torch.Tensor,
    normed: torch.Tensor,
    attention_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_layer_output` (or its compiled form) with `layer`'s weights, norming `next_layer`'s input too."""
    attention, mlp = layer.self_attention, layer.mlp
    after = None if next_layer is None else next_layer.input_layernorm
    return output(
        residual,
        normed,
        attention_out,
        (attention.dense.weight, attention.dense.bias),
        (mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias),
        (mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias),
        None if after is None else (after.weight, after.bias, after.eps),
    )


def _regional_layer(
    self: FalconDecoderLayer,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: Any,
    position_ids: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    parts: tuple[Callable[..., Any], Callable[..., Any]],
    next_layer: FalconDecoderLayer | None,
    handoff: dict[str, Any],
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """FalconDecoderLayer.forward for the multi-query, parallel-attention layout, as two tensor-only
    functions around the attention: compiled once, they serve every layer (the weights are arguments),
    where compiling the whole model would trace all 32 layers.

    Each layer also norms the next layer's input and leaves it in `handoff`, with its output and the
    layer it is for; that layer takes it only if its input is that very output tensor, and norms its
    input itself otherwise."""
    if position_embeddings is None:
        raise ValueError("rotary Falcon attention needs position embeddings")
    attention = self.self_attention
    inputs, output = parts
    layer_idx = attention.layer_idx
    target = None
    if isinstance(layer_past, PagedKVCache):
        # The buffers are allocated before the compiled part writes them.
        like = hidden_states.new_empty(0, 1, 0, attention.head_dim)
        target = layer_past.target(layer_idx, like)
    given = handoff["for"] is self and handoff["hidden"] is hidden_states
    normed = handoff["normed"] if given else None
    normed, query, key, value = _run_inputs(inputs, self, hidden_states, normed, *position_embeddings, target)
    if target is not None:
        key, value = layer_past.visible(layer_idx, key, value)
        out = _attention(query, key, value, layer_past.plain_causal, attention_mask)
    else:
        out = _attend(query, key, value, layer_past, layer_idx, attention_mask)
    hidden, next_normed = _run_output(output, self, next_layer, hidden_states, normed, out)
    handoff.update({"for": next_layer, "hidden": hidden, "normed": next_normed})
    return hidden, None


Parts = tuple[Callable[..., Any], Callable[..., Any]]  # (_layer_inputs, _layer_output), maybe compiled


def regional_layers(model: torch.nn.Module) -> list[FalconDecoderLayer]:
    """The layers `compile_regions` can take: Falcon multi-query, parallel attention, GELU, rotary."""
    layers = [m for m in model.modules() if isinstance(m, FalconDecoderLayer)]
    config = getattr(model, "config", None)
    fits = (
        getattr(config, "multi_query", False)
        and not getattr(config, "new_decoder_architecture", True)
        and getattr(config, "parallel_attn", False)
        and not getattr(config, "alibi", True)
        and getattr(config, "activation", None) == "gelu"
    )
    return layers if fits else []


def compile_regions(modules: list[torch.nn.Module], compile: Any) -> Parts:
    """Run each layer as `_regional_layer`, its two tensor functions wrapped by `compile` (torch.compile,
    or any wrapper with its signature); returns them."""
    # Automatic dynamic shapes (not dynamic=True): the sizes that vary between calls (batch rows,
    # tokens) turn symbolic on the first recompile, while the weights' sizes stay constants, so the
    # generated kernels index with fixed strides. On the H100 that made the prefill of 8 x 128 tokens
    # 25 ms instead of 28 (dynamic=True), and the compile shorter.
    # Each part gets a graph per kind of call: the first layer's (norms its input) or the others', the
    # last layer's (no next norm) or the others', prefill or decode or no cache write, batch 1 or more;
    # past dynamo's default of 8 graphs a function would run uncompiled for the shapes that come last.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 32)
    parts = (compile(_layer_inputs), compile(_layer_output))
    handoff: dict[str, Any] = {"for": None, "hidden": None, "normed": None}
    layers = cast(list[FalconDecoderLayer], modules)  # as regional_layers found them
    layers = sorted(layers, key=lambda layer: layer.self_attention.layer_idx)  # the order they run in
    for layer, next_layer in zip(layers, [*layers[1:], None], strict=True):
        forward = functools.partial(_regional_layer, parts=parts, next_layer=next_layer, handoff=handoff)
        layer.forward = types.MethodType(forward, layer)  # type: ignore[method-assign]
    return parts


def restore_layers(layers: list[torch.nn.Module]) -> None:
    """Undo `compile_regions`: the layers run transformers' own forward again."""
    for layer in layers:
        layer.__dict__.pop("forward", None)


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
    context.calls += 1
    if key.dim() == 3 and context.decode is not None:
        out = paged_decode(query, key, value, context.decode, self.head_dim**-0.5).transpose(1, 2)
    elif getattr(layer_past, "plain_causal", False):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, enable_gqa=True)
    return self.dense(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)), None


def adapt(model: PreTrainedModel) -> None:
    """Apply the adaptations that fit this model; other models are left as they are."""
    for module in model.modules():
        if not isinstance(module, FalconAttention) or module.config.alibi:
            continue
        if module.new_decoder_architecture:
            module.forward = types.MethodType(_grouped_query_attention, module)  # type: ignore[method-assign]
        elif module.multi_query:
            module.forward = types.MethodType(_multi_query_attention, module)  # type: ignore[method-assign]
