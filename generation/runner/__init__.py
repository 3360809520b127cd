"""The runner: what runs on the device. `model_runner` steps the model; `inputs` holds its fixed-address
inputs, `memory` sizes the KV pool, `graphs` captures the step's parts, `compiled` is torch.compile (on
by default)."""

from trickle.generation.runner.model_runner import Launched, ModelRunError, ModelRunner

__all__ = ["Launched", "ModelRunError", "ModelRunner"]
