"""ModelHead: logits from hidden states the way the causal LM itself makes them.

The engine runs the base model itself (its own positions, masks and KV cache) and keeps only the hidden
states of the positions it samples from. The logits must then come out exactly as the model's own forward
would make them, which is more than the output embedding: Cohere multiplies by `logit_scale`, Granite
divides by `logits_scaling`, Gemma 2 and 3 softcap, MiniCPM scales the hidden states first. Rather than
repeat each family's arithmetic, the head runs the causal LM's own forward with its base model swapped
for a stand-in that returns the hidden states the engine kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast


@dataclass
class _Output(BaseModelOutputWithPast):
    """The base model's output with only the hidden states: any other field a causal LM reads (router
    logits, cross attentions, ...) is None, as it is when the model was not asked for it."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _Given(torch.nn.Module):
    """Stands in for the base model inside the causal LM's forward and returns `hidden` as its output.
    The base's own children answer with the stand-in too (OPT's forward calls `self.model.decoder`)."""

    def __init__(self, children: set[str]) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self._children = children

    def forward(self, *args: Any, **kwargs: Any) -> _Output:
        return _Output(last_hidden_state=self.hidden)

    def __getattr__(self, name: str) -> Any:
        if name != "_children" and name in self._children:
            return self
        return super().__getattr__(name)


class ModelHead:
    """`head(hidden)`: [N, hidden] -> [N, vocab] logits, as `model(...)` makes them from those states."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._prefix = model.base_model_prefix
        base = getattr(model, self._prefix)
        self._given = _Given({name for name, _ in base.named_children()})
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        modules = self.model._modules
        base = modules[self._prefix]
        self._given.hidden = hidden[:, None]
        modules[self._prefix] = self._given
        try:
            logits = self.model(input_ids=self._ids.expand(hidden.shape[0], 1), use_cache=False).logits
        finally:
            modules[self._prefix] = base
            self._given.hidden = None
        return logits[:, -1]
