"""Load the causal LM and tokenizer that trickle streams from, or build the tiny offline demo model."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    FalconConfig,
    FalconForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from trickle.generation.random_models import SHAPES, random_model

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_CHOICES = ("auto", *_DTYPES)
_DEVICE_CHOICES = ("auto", "cpu", "cuda")
_QUANTIZE_CHOICES = ("none", "8bit", "4bit")

# Errors that transformers, huggingface_hub and safetensors raise for a model that cannot be loaded.
# RuntimeError covers size mismatches in the weights and running out of GPU memory.
_LOAD_ERRORS = (OSError, ValueError, ImportError, KeyError, RuntimeError, SafetensorError)

_DEMO_SPEC = "demo"
_RANDOM_PREFIX = "random:"
HUB_PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_EOS = "<|endoftext|>"
_DEMO_SEED = 20240601
_DEMO_VOCAB_SIZE = 1000
# Training on the corpus (about 650 tokens): 400 steps of 16 windows of 64 tokens, some 8 s on one core.
_DEMO_TRAIN_STEPS, _DEMO_TRAIN_BATCH, _DEMO_TRAIN_WIDTH = 400, 16, 64
# The demo directory is renamed into place whole, so these files being present means the build finished.
_DEMO_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Training text for the demo tokenizer. The non-ASCII words appear once each on purpose: the trainer
# only merges pairs seen at least twice, so their bytes stay split across tokens and the demo model
# exercises streaming of characters that arrive in pieces.
_DEMO_CORPUS = """\
Every morning the little bakery at the corner of the square opens its shutters before the sun is up.
The baker lights the oven, weighs the flour and the water, and listens to the radio while the dough
rests. By the time the first customers arrive, the shelves are full of bread, and the smell of it
drifts across the square to the fountain and the benches where the old men sit and talk.

Next door there is a small café with four tables and a window that looks out on the street. The
owner says that she was naïve when she opened it, because she thought people would come for the
coffee. They come for the conversation. Students read their books there, a painter sketches the
people passing by, and a retired teacher practises writing 日本語 in a notebook, one careful stroke
at a time. When someone tells a good joke, the owner draws a little emoji 🙂 on their receipt.

A text streaming server works a little like that bakery. It does not wait until everything is ready.
It sends each piece as soon as the piece exists, so the reader can start reading while the rest is
still being written. The words arrive one after another, the sentences grow, and the page fills up
the way the shelves fill up with bread in the early morning.

The model in this demo is tiny and has read nothing but these few paragraphs, so it writes only
their words. That is fine. It is here so that the server can start in seconds on any computer,
without a network and without a graphics card, and so that the tests can check that the whole path
from a request to a stream of text works from the first byte to the last.
"""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready to generate, with the tokenizer that goes with it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    name: str
    device: torch.device
    dtype: torch.dtype


class ModelLoadError(Exception):
    """A model that cannot be loaded; str(err) is one line a user can act on."""


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str = "none",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `spec` ("demo", "random:<shape>", a local directory or a hub id) in eval mode on its device."""
    _check_choice(spec, "quantize", quantize, _QUANTIZE_CHOICES)
    torch_device = _resolve_device(spec, device)
    torch_dtype = _resolve_dtype(spec, dtype, torch_device)
    _check_quantization_possible(spec, quantize, torch_device)
    if spec.startswith(_RANDOM_PREFIX):
        return _random_model(spec, torch_dtype, torch_device, quantize)
    source = _resolve_source(spec)
    options: dict[str, Any] = {"cache_dir": cache_dir}
    if _is_hub_id(spec):
        # A hub id: what the local cache holds first, the Hub only for what it lacks, and a Hub that
        # cannot be reached is one line at once, not minutes of retries.
        if _in_cache(spec, cache_dir):
            try:
                return _load(
                    spec, source, torch_dtype, torch_device, quantize, {**options, "local_files_only": True}
                )
            except ModelLoadError:
                pass
        _check_hub_reachable(spec)
    return _load(spec, source, torch_dtype, torch_device, quantize, options)


def check_source(spec: str) -> None:
    """What can be known in a few seconds without loading anything: ModelLoadError (one line) for a
    missing directory, an unknown random shape, or a hub id that is neither in the local cache nor
    reachable. The server asks this before it binds its port."""
    if spec == _DEMO_SPEC:
        return
    if spec.startswith(_RANDOM_PREFIX):
        if spec.removeprefix(_RANDOM_PREFIX) not in SHAPES:
            raise _fail(spec, f"unknown shape; known shapes: {', '.join(SHAPES)}")
        return
    _resolve_source(spec)  # a local path that is not a model directory fails here
    if _is_hub_id(spec) and not _in_cache(spec, None):
        _check_hub_reachable(spec)


def _is_hub_id(spec: str) -> bool:
    return (
        spec != _DEMO_SPEC
        and not spec.startswith(_RANDOM_PREFIX)
        and not Path(spec).expanduser().exists()
        and not _looks_like_path(spec)
    )


def _load(
    spec: str, source: str, dtype: torch.dtype, device: torch.device, quantize: str, options: dict[str, Any]
) -> LoadedModel:
    # The tokenizer is small: load it first so a bad one fails before gigabytes of weights are read.
    tokenizer = _load_tokenizer(spec, source, options)
    model = _load_weights(spec, source, dtype, device, quantize, options)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, device=device, dtype=dtype)


def _in_cache(spec: str, cache_dir: Path | None) -> bool:
    found = try_to_load_from_cache(spec, "config.json", cache_dir=cache_dir)
    return isinstance(found, str)


def _check_hub_reachable(spec: str) -> None:
    if hub_constants.is_offline_mode() or not _hub_reachable():
        raise _fail(spec, _hub_unreachable_reason())


@functools.cache
def _hub_reachable() -> bool:
    """Whether a connection to the Hub opens within a few seconds (asked once a process). Behind a proxy
    the answer is left to the download itself."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    address = urllib.parse.urlsplit(hub_constants.ENDPOINT)
    try:
        socket.create_connection((address.hostname, address.port or 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _random_model(spec: str, dtype: torch.dtype, device: torch.device, quantize: str) -> LoadedModel:
    shape = spec.removeprefix(_RANDOM_PREFIX)
    if shape not in SHAPES:
        raise _fail(spec, f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    if quantize != "none":
        raise _fail(spec, "random-weight models cannot be quantized; save one and load the directory")
    with _translate_errors(spec):
        model, tokenizer = random_model(shape, dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, device=device, dtype=dtype)


def demo_model_dir() -> Path:
    """Where the demo model is cached: $XDG_CACHE_HOME/trickle/demo-v3 (default ~/.cache)."""
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "trickle" / "demo-v3"


def build_demo_model(directory: Path) -> None:
    """Write the demo model (tiny random Falcon plus a byte-level BPE tokenizer) into `directory`.

    Two builds write identical files, so a cached copy and a fresh one are interchangeable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_demo_tokenizer()
    model = _build_demo_falcon(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _fail(spec: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load model {spec!r}: {reason}")


def _check_choice(spec: str, setting: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(spec, f"{setting}={value!r} is not one of {', '.join(choices)}")


def _resolve_device(spec: str, device: str) -> torch.device:
    _check_choice(spec, "device", device, _DEVICE_CHOICES)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise _fail(spec, "device='cuda' but CUDA is not available here (use device='auto' or 'cpu')")
    # An explicit index, so LoadedModel.device compares equal to the parameters' device.
    return torch.device("cuda", torch.cuda.current_device())


def _resolve_dtype(spec: str, dtype: str, device: torch.device) -> torch.dtype:
    _check_choice(spec, "dtype", dtype, _DTYPE_CHOICES)
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_quantization_possible(spec: str, quantize: str, device: torch.device) -> None:
    if quantize == "none":
        return
    missing = []
    if device.type != "cuda":
        missing.append("device='cuda'" if torch.cuda.is_available() else "a CUDA GPU (none is available)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install 'trickle[quantize]')")
    if missing:
        raise _fail(spec, f"quantize={quantize!r} needs {' and '.join(missing)}")


def _resolve_source(spec: str) -> str:
    """What to hand to from_pretrained: a local directory or a hub id."""
    if spec == _DEMO_SPEC:
        return str(_ensure_demo_model())
    path = Path(spec).expanduser()
    if path.exists():
        return str(_check_model_directory(spec, path))
    if _looks_like_path(spec):
        raise _fail(spec, "no such directory")
    return spec


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "owner/name" and never start with "." or "~".
    return os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1 or "\\" in spec


def _check_model_directory(spec: str, path: Path) -> Path:
    if not path.is_dir():
        raise _fail(spec, "not a directory (pass the directory that holds config.json)")
    if not (path / "config.json").is_file():
        raise _fail(spec, "the directory has no config.json (expected a model saved with save_pretrained)")
    return path


def _ensure_demo_model() -> Path:
    target = demo_model_dir()
    if _is_complete_demo(target):
        return target
    try:
        _build_into_place(target)
    except OSError as err:
        raise _fail(_DEMO_SPEC, f"cannot build the demo model in {target}: {err.strerror or err}") from err
    return target


def _is_complete_demo(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _DEMO_FILES)


def _build_into_place(target: Path) -> None:
    # Build in a sibling and rename, so a crash mid-build never leaves a half-written cache behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        build_demo_model(staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists() and not _is_complete_demo(target):
        _discard(target)
    try:
        staging.rename(target)
    except OSError:
        # Another process won the rename; builds are deterministic, so its copy is as good as ours.
        if not _is_complete_demo(target):
            raise


def _discard(directory: Path) -> None:
    # Rename first so a concurrent reader never sees a directory that is being deleted.
    doomed = directory.with_name(f".{directory.name}-stale-{uuid.uuid4().hex}")
    try:
        directory.rename(doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _load_tokenizer(spec: str, source: str, options: dict[str, Any]) -> PreTrainedTokenizerFast:
    with _translate_errors(spec):
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    # Incremental detokenization relies on the Rust tokenizer; slow Python tokenizers lack it.
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        kind = type(tokenizer).__name__
        raise _fail(spec, f"trickle needs a fast tokenizer (tokenizer.json), but this model has {kind}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise _fail(spec, "the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_weights(
    spec: str,
    source: str,
    dtype: torch.dtype,
    device: torch.device,
    quantize: str,
    options: dict[str, Any],
) -> PreTrainedModel:
    placement = _quantization_kwargs(quantize, dtype, device)
    with _translate_errors(spec):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options, **placement)
        if quantize == "none":
            # Quantized weights are placed by device_map and must not be moved again. transformers
            # wraps Module.to with functools.wraps, which hides the bound method's signature from mypy.
            model = model.to(device)  # type: ignore[arg-type]
    if not isinstance(model, PreTrainedModel):
        raise _fail(spec, f"expected a transformers model, got {type(model).__name__}")
    model.eval()
    return model


def _quantization_kwargs(quantize: str, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    if quantize == "none":
        return {}
    if quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
        )
    return {"quantization_config": config, "device_map": {"": device.index}}


@contextmanager
def _translate_errors(spec: str) -> Iterator[None]:
    try:
        yield
    except _LOAD_ERRORS as err:
        raise _fail(spec, _describe(err)) from err


def _describe(err: BaseException) -> str:
    """The cause of a load failure in a few words, recognising the common ones."""
    causes = _cause_chain(err)
    if any(isinstance(cause, torch.OutOfMemoryError) for cause in causes):
        return "out of GPU memory (try quantize='4bit', a smaller dtype, or a smaller model)"
    if "backend tokenizer" in str(err):
        return "no tokenizer.json, and the slow tokenizer could not be converted (install sentencepiece)"
    if isinstance(err, KeyError):
        return f"a model file lacks the expected key {err}"
    return _describe_hub_error(causes) or _first_line(err)


def _describe_hub_error(causes: list[BaseException]) -> str | None:
    if any(isinstance(cause, hub_errors.GatedRepoError) for cause in causes):
        return "the model is gated on the Hugging Face Hub (accept its terms there, then run `hf auth login`)"
    if any(isinstance(cause, hub_errors.RepositoryNotFoundError) for cause in causes):
        return "no such model on the Hugging Face Hub (check the name; private models need `hf auth login`)"
    if any(isinstance(cause, hub_errors.HFValidationError) for cause in causes):
        return "not a local directory nor a valid Hugging Face Hub id (expected 'owner/name')"
    unreachable = (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)
    if any(isinstance(cause, unreachable) for cause in causes):
        return _hub_unreachable_reason()
    return None


def _cause_chain(err: BaseException) -> list[BaseException]:
    chain = [err]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def _hub_unreachable_reason() -> str:
    if hub_constants.is_offline_mode():
        return (
            "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            " (unset it to download, or pass a local directory)"
        )
    return (
        "not found locally and the Hugging Face Hub cannot be reached"
        " (check the network, or pass a local directory)"
    )


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _build_demo_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_DEMO_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[_EOS],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_DEMO_CORPUS], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=_EOS, pad_token=_EOS)
    wrapped.chat_template = _CHAT_TEMPLATE
    return wrapped


def _build_demo_falcon(tokenizer: PreTrainedTokenizerFast) -> FalconForCausalLM:
    eos_id = tokenizer.eos_token_id
    config = FalconConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        new_decoder_architecture=False,
        multi_query=True,
        alibi=False,
        parallel_attn=True,
        bias=False,
        max_position_embeddings=8192,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    # A private RNG stream: fixed weights without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_DEMO_SEED)
        model = FalconForCausalLM(config).float()
        _train_on_the_corpus(model, torch.tensor(tokenizer.encode(_DEMO_CORPUS)))
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    return model


def _train_on_the_corpus(model: FalconForCausalLM, ids: torch.Tensor) -> None:
    """A few seconds of training on the built-in text, so that the demo writes its words, not noise.
    One thread and the caller's fixed seed: two builds give the same weights, byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(_DEMO_TRAIN_STEPS):
            starts = torch.randint(0, len(ids) - _DEMO_TRAIN_WIDTH, (_DEMO_TRAIN_BATCH,))
            batch = torch.stack([ids[start : start + _DEMO_TRAIN_WIDTH] for start in starts.tolist()])
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
        model.eval()
