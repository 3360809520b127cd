"""Model families that need more than transformers' stock code to run in the engine: one module per
family, chosen by the config's `model_type`. Every other family runs as transformers defines it; the
engine hands it positions, masks made with transformers' own mask functions (`generation.masks`) and its
KV cache, and takes its logits from the model's own head (`generation.head`). Adding a family's fixes is
adding a module here and its line in `FAMILIES`.

A family module has `adapt(model)`: fixes applied to the model's module instances, with the same
arithmetic (what a CUDA graph cannot capture, what costs memory or time for nothing).

`decoder_layers(model)` finds any model's repeated layers, by the class names transformers lists in
`_no_split_modules`: the runner compiles them as shared regions (`generation.runner.compiled`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from transformers import PreTrainedModel

from trickle.generation.models import falcon

FAMILIES: dict[str, ModuleType] = {"falcon": falcon}

__all__ = ["FAMILIES", "adapt", "decoder_layers"]


def _family(model: torch.nn.Module) -> ModuleType | None:
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", ""))


def adapt(model: PreTrainedModel) -> None:
    """Apply the fixes of the model's family, if it has any."""
    family = _family(model)
    if family is not None:
        family.adapt(model)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, in the order they run ([] where transformers names none): the
    modules of the classes in its `_no_split_modules`, outermost only."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        inside = any(path.startswith(outer + ".") for outer in found)
        if type(module).__name__ in names and not inside:
            found[path] = module
    return list(found.values())
