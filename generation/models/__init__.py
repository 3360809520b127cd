"""Model families that need more than transformers' stock code to run in the engine: one module per
family, chosen by the config's `model_type`. Every other family runs as transformers defines it; the
engine hands it positions, masks made with transformers' own mask functions (`generation.masks`) and its
KV cache, and takes its logits from the model's own head (`generation.head`). Adding a family's fixes is
adding a module here and its line in `FAMILIES`.

A family module has `adapt(model)`: fixes applied to the model's module instances, with the same
arithmetic (what a CUDA graph cannot capture, what costs memory or time for nothing). It may also have
`regional_layers(model)`: layers the runner can compile as shared regions; the functions that act on
those layers (`compile_regions`, `restore_layers`) are that family's, named here once (Falcon
multi-query is the only such family today).
"""

from __future__ import annotations

from types import ModuleType

import torch
from transformers import PreTrainedModel

from trickle.generation.models import falcon
from trickle.generation.models.falcon import Parts, compile_regions, restore_layers

FAMILIES: dict[str, ModuleType] = {"falcon": falcon}

__all__ = [
    "FAMILIES",
    "Parts",
    "adapt",
    "compile_regions",
    "regional_layers",
    "restore_layers",
]


def _family(model: torch.nn.Module) -> ModuleType | None:
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", ""))


def adapt(model: PreTrainedModel) -> None:
    """Apply the fixes of the model's family, if it has any."""
    family = _family(model)
    if family is not None:
        family.adapt(model)


def regional_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of `model` that can run as compiled regions ([] for most models)."""
    family = _family(model)
    found = getattr(family, "regional_layers", None)
    return list(found(model)) if found is not None else []
