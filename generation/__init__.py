"""Everything that touches the model: loading, the engine thread and its asyncio bridge. No HTTP here."""

from trickle.generation.async_engine import (
    AsyncEngine,
    EngineConfig,
    EngineUnavailableError,
    QueueFullError,
)
from trickle.generation.loader import LoadedModel, ModelLoadError, check_source, load_model
from trickle.generation.messages import RequestOutput
from trickle.generation.params import SamplingParams
from trickle.generation.prompts import Prompts, RequestError
from trickle.generation.runner import ModelRunError
from trickle.generation.streams import RequestStream

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
