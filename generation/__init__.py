"""Everything that touches the model: loading, the engine thread and its asyncio bridge. No HTTP here.

What needs torch is imported when first asked for: an HTTP worker process imports this package (the
routes' parameters, prompts and streams) without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trickle.generation.errors import EngineUnavailableError, QueueFullError
from trickle.generation.messages import RequestOutput
from trickle.generation.params import SamplingParams
from trickle.generation.prompts import Prompts, RequestError
from trickle.generation.streams import RequestStream

if TYPE_CHECKING:
    from trickle.generation.async_engine import AsyncEngine
    from trickle.generation.engine_config import EngineConfig
    from trickle.generation.loader import LoadedModel, ModelLoadError, check_source, load_model
    from trickle.generation.runner import ModelRunError

_LAZY = {
    "AsyncEngine": "async_engine",
    "EngineConfig": "engine_config",
    "LoadedModel": "loader",
    "ModelLoadError": "loader",
    "check_source": "loader",
    "load_model": "loader",
    "ModelRunError": "runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trickle.generation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trickle.generation.{module}"), name)


__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineUnavailableError",
    "LoadedModel",
    "ModelLoadError",
    "ModelRunError",
    "Prompts",
    "QueueFullError",
    "RequestError",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "check_source",
    "load_model",
]
