"""The server's settings: one model, read from CLI flags > environment > a TOML file > defaults."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "TRICKLE_"


class SettingsError(Exception):
    """A setting that cannot be used; str(err) is one line naming the setting."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        use_attribute_docstrings=True,
        cli_kebab_case=True,
        cli_prog_name="trickle",
        cli_implicit_flags=True,
    )

    config: Path | None = None
    """A TOML file of settings; flags and environment variables override it."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one)."""
    model: str = "tiiuae/falcon-7b-instruct"
    """A Hugging Face hub id, a local directory, or `demo` for a tiny built-in model."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weight and activation dtype; auto is bfloat16 on a GPU and float32 on the CPU."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the model runs; auto picks CUDA when it is available."""
    quantize: Literal["none", "8bit", "4bit"] = "none"
    """Load the weights quantized with bitsandbytes (CUDA only)."""
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Most requests generating at once (rows in the batch)."""
    max_seq_len: int | None = Field(default=None, ge=8, le=1_048_576)
    """Most tokens one request may hold in the KV cache, prompt plus generated. By default the model's
    context length (2048 where its config names none); a longer value is cut to the model's."""
    prefill_token_budget: int = Field(default=1024, ge=1)
    """Most prompt tokens prefilled in one engine step, so long prompts cannot stall running streams: a
    longer prompt that comes while others stream is prefilled a chunk of this size a step (read back from
    the prefix cache by the next; with --no-prefix-cache it goes whole)."""
    prefill_pacing: float = Field(default=0.0, ge=0.0)
    """While requests stream, a step prefills only as many new prompts as keep it within this many
    times the time of a step that only streams (measured as the server runs), so streams stay smooth
    while newcomers arrive; the first newcomer of a step always goes in. It costs throughput (each
    prefill reads every weight once, so more, smaller prefills cost more): off (0) by default, every
    step then prefills up to the prefill token budget. It paces the prompts prefilled in steps of their own
    (what it learns the cost of); newcomers mixed into the streaming rows' step (the default) are
    bounded by --mixed-prefill-tokens instead."""
    mixed_prefill_tokens: int = Field(default=512, ge=0)
    """While requests stream, new prompts run inside the streaming rows' own step (one pass over the
    weights for both, so a newcomer no longer holds every stream back for a prefill of its own), up to
    this many prompt tokens a step (at most the prefill token budget), which is then the step's
    prefill budget: smaller keeps the streams smoother while newcomers arrive, larger admits them
    sooner. 0: newcomers always prefill apart. On a GPU, only models whose attention takes trickle's
    paged kernels mix (see the log's "decode attention" line)."""
    kv_cache_tokens: int | None = Field(default=None, ge=16)
    """Positions the KV cache holds, all requests together. By default, on a GPU, what memory leaves
    after the weights and activations; on the CPU, max batch size x max sequence length, up to a quarter
    of the memory available."""
    prefix_cache: bool = True
    """Reuse the KV cache of prompts' shared leading tokens (a system prompt, the turns of a chat)
    instead of computing it again; --no-prefix-cache turns it off."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Share of the GPU's memory that weights, activations and the KV cache may fill together."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (on a GPU); --no-cuda-graphs runs it eagerly."""
    compile: bool = True
    """torch.compile the decoder layers and the sampler where the step runs in CUDA graphs (a GPU):
    fused kernels between the weight GEMMs. One layer compiles for all, cached on disk across starts;
    --no-compile skips it. A part that fails to compile runs uncompiled."""
    workers: int | None = Field(default=None, ge=0, le=64)
    """HTTP worker processes, sharing the port: they parse requests, turn tokens into text and write the
    streams, while this process runs the engine. By default a quarter of the CPU cores, 1 to 8; 0 serves
    HTTP in the engine's own process (the interpreter lock is then shared with the engine thread)."""
    max_queue: int = Field(default=256, ge=0)
    """Requests that may wait for a free row; past that, new requests get 503 with Retry-After."""
    request_timeout: float = Field(default=600.0, gt=0)
    """Seconds a request may take, queued and generating (then `timeout`); a request may ask for less."""
    resume_grace: float = Field(default=30.0, ge=0, le=3600)
    """Seconds a /stream request is kept for its client to come back (GET /stream/{id} with
    Last-Event-ID) once the client went away or the stream ended; one left by its client runs on that
    long, then is cancelled. 0: no resuming (a client that leaves cancels its request at once)."""
    drain_timeout: float = Field(default=60.0, ge=0)
    """On SIGTERM or SIGINT, seconds running streams may take to finish before they end with `shutdown`."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body accepted, in bytes (larger is 413)."""
    read_timeout: float = Field(default=30.0, gt=0)
    """Seconds a client may take to send a request's body once its headers are in; past it the request
    gets 408 and its connection is closed."""
    ping_interval: float = Field(default=15.0, gt=0)
    """Seconds between `: ping` comments on an idle stream."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """API keys that may call the generation routes (comma-separated); none means open."""
    api_keys_file: Path | None = None
    """A file of API keys, one a line (blank lines and # comments skipped)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe log level written."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """Log rendering; auto is readable on a terminal and JSON otherwise."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("prefill_pacing")
    @classmethod
    def _check_pacing(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("must be 0 (off) or more than 1 (a step's time, in decode steps)")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("not a readable file")
        return value

    def worker_count(self) -> int:
        """`workers`, or by default a quarter of the CPU cores (at least 1, at most 8)."""
        if self.workers is not None:
            return self.workers
        return max(1, min(8, (os.cpu_count() or 1) // 4))

    def all_api_keys(self) -> list[str]:
        """Keys from the setting and from the keys file together."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _toml_path.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


# The TOML path must be known before the sources are built; load_settings sets it.
_toml_path: dict[str, Path | None] = {"path": None}


def _config_path(argv: Sequence[str]) -> Path | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(list(argv))
    raw = known.config or os.environ.get(f"{ENV_PREFIX}CONFIG")
    if raw is None:
        return None
    path = Path(raw)
    if not path.is_file():
        raise SettingsError(f"invalid setting 'config': {raw!r} is not a readable file")
    return path


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "settings"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid setting {name!r}: {message} (got {first.get('input')!r})"


def load_settings(argv: Sequence[str] = ()) -> Settings:
    """Build the settings from CLI arguments, the environment and an optional TOML file.

    Raises SettingsError with one line naming the setting when a value is wrong.
    """
    _toml_path["path"] = path = _config_path(argv)
    try:
        return CliApp.run(Settings, cli_args=list(argv))
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"invalid setting 'config': {str(path)!r} is not valid TOML: {err}") from err
    except ValidationError as err:
        raise SettingsError(_one_line(err)) from err
    except SourceError as err:
        raise SettingsError(str(err).splitlines()[0]) from err
    finally:
        _toml_path["path"] = None
