"""Everything that touches the model: loading, the engine thread and its asyncio bridge. No HTTP here."""

from generation.async_engine import (
    AsyncEngine,
    EngineConfig,
    EngineUnavailableError,
    QueueFullError,
    RequestStream,
)
from generation.loader import LoadedModel, ModelLoadError, check_source, load_model
from generation.messages import RequestOutput
from generation.params import SamplingParams
from generation.prompts import Prompts, RequestError
from generation.runner import ModelRunError

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
