"""Tests for generation.loader: the demo model, local directories, and one-line load errors."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from transformers import GenerationMixin

from trickle.generation import loader
from trickle.generation.loader import (
    _DEMO_CORPUS,
    LoadedModel,
    ModelLoadError,
    build_demo_model,
    demo_model_dir,
    load_model,
)

MULTIBYTE_TEXT = "café 日本語 🙂"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    build_demo_model(directory)
    return directory


@pytest.fixture(scope="module")
def demo(demo_dir: Path) -> LoadedModel:
    return load_model(str(demo_dir), device="cpu")


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def load_error(spec: str, **settings: Any) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as caught:
        load_model(spec, **settings)
    message = str(caught.value)
    assert "\n" not in message
    assert repr(spec) in message
    return caught.value


def test_demo_build_is_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    build_demo_model(tmp_path)

    first = {path.name: path.read_bytes() for path in demo_dir.iterdir()}
    second = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= first.keys()
    assert first == second


def test_demo_model_is_a_tiny_float32_falcon(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "config.json").read_text())
    generation_config = json.loads((demo_dir / "generation_config.json").read_text())

    assert config["architectures"] == ["FalconForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["dtype"]) == (64, 2, "float32")
    assert generation_config["do_sample"] is False
    assert generation_config["eos_token_id"] == generation_config["pad_token_id"] == config["eos_token_id"]


def test_local_directory_loads_in_eval_mode_and_generates(demo: LoadedModel, demo_dir: Path) -> None:
    prompt = demo.tokenizer("The bakery opens", return_tensors="pt")
    assert isinstance(demo.model, GenerationMixin)

    output = demo.model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)

    assert demo.name == str(demo_dir)
    assert (demo.device, demo.dtype) == (torch.device("cpu"), torch.float32)
    assert not demo.model.training
    assert next(demo.model.parameters()).dtype == torch.float32
    assert output.shape == (1, prompt["input_ids"].shape[1] + 4)


def test_tokenizer_is_fast_with_eos_padding_and_chat_template(demo: LoadedModel) -> None:
    tokenizer = demo.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert tokenizer.is_fast
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer) == demo.model.config.vocab_size
    assert prompt == "system: Be brief.\nuser: Hi\nassistant:"


def test_tokenizer_round_trips_multibyte_text_split_across_tokens(demo: LoadedModel) -> None:
    encoding = demo.tokenizer(MULTIBYTE_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]

    # Byte-level BPE gives every byte of a split character the character's own offsets.
    tokens_per_char = Counter(MULTIBYTE_TEXT[start:end] for start, end in offsets)
    split_chars = {char for char, count in tokens_per_char.items() if len(char.encode()) > 1 and count > 1}
    assert demo.tokenizer.decode(ids) == MULTIBYTE_TEXT
    assert {"é", "日", "🙂"} <= split_chars
    assert "\ufffd" in demo.tokenizer.decode(ids[:4])  # "caf" plus the first byte of "é"


def test_tokenizer_pad_token_falls_back_to_eos(demo_dir: Path, tmp_path: Path) -> None:
    for path in demo_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config_path = tmp_path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    del tokenizer_config["pad_token"]
    config_path.write_text(json.dumps(tokenizer_config))

    loaded = load_model(str(tmp_path))

    assert loaded.tokenizer.pad_token == "<|endoftext|>"


def test_demo_model_dir_follows_xdg_cache_home(cache_home: Path) -> None:
    assert demo_model_dir() == cache_home / "trickle" / "demo-v3"


def test_demo_spec_builds_once_then_reuses_the_cache(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_model("demo")
    built = demo_model_dir().stat()

    def refuse_rebuild(directory: Path) -> None:
        raise AssertionError(f"demo model rebuilt into {directory}")

    monkeypatch.setattr(loader, "build_demo_model", refuse_rebuild)
    second = load_model("demo")

    assert first.name == second.name == "demo"
    assert (demo_model_dir().stat().st_ino, demo_model_dir().stat().st_mtime_ns) == (
        built.st_ino,
        built.st_mtime_ns,
    )
    assert [path.name for path in (cache_home / "trickle").iterdir()] == ["demo-v3"]


def test_incomplete_demo_cache_is_replaced(cache_home: Path) -> None:
    leftover = demo_model_dir()
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")

    load_model("demo")

    assert (leftover / "model.safetensors").is_file()
    assert [path.name for path in (cache_home / "trickle").iterdir()] == ["demo-v3"]


def test_demo_build_copes_with_a_concurrent_builder_winning(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build_and_lose_the_race(directory: Path) -> None:
        build_demo_model(demo_model_dir())  # the other process finishes first
        build_demo_model(directory)

    monkeypatch.setattr(loader, "build_demo_model", build_and_lose_the_race)

    loaded = load_model("demo")

    assert loaded.name == "demo"
    assert [path.name for path in (cache_home / "trickle").iterdir()] == ["demo-v3"]


def test_missing_local_directory_is_a_one_line_error(tmp_path: Path) -> None:
    error = load_error(str(tmp_path / "nope"))

    assert "no such directory" in str(error)


def test_unknown_hub_id_offline_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads the variable once at import, so the constant is patched as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    error = load_error("trickle-tests/no-such-model")

    assert "HF_HUB_OFFLINE" in str(error) and "\n" not in str(error)


@pytest.mark.parametrize(
    ("broken_file", "contents"),
    [("model.safetensors", None), ("model.safetensors", b"not safetensors"), ("config.json", b"{oops")],
)
def test_broken_model_directory_is_a_one_line_error(
    demo_dir: Path, tmp_path: Path, broken_file: str, contents: bytes | None
) -> None:
    for path in demo_dir.iterdir():
        if path.name != broken_file:
            (tmp_path / path.name).write_bytes(path.read_bytes())
    if contents is not None:
        (tmp_path / broken_file).write_bytes(contents)

    error = load_error(str(tmp_path))

    assert error.__cause__ is not None


def test_directory_without_config_is_a_one_line_error(tmp_path: Path) -> None:
    error = load_error(str(tmp_path))

    assert "config.json" in str(error)


def test_cuda_device_without_cuda_is_an_error(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    error = load_error(str(demo_dir), device="cuda")

    assert "CUDA is not available" in str(error)


def test_quantization_without_cuda_is_an_error(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    error = load_error(str(demo_dir), quantize="8bit")

    assert "quantize='8bit' needs a CUDA GPU" in str(error)


def test_quantization_without_bitsandbytes_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: None if name == "bitsandbytes" else real_find_spec(name, package),
    )

    # A missing directory: reaching the loading step would report that instead.
    error = load_error(str(tmp_path / "nope"), dtype="float16", device="cuda", quantize="4bit")

    assert "needs the bitsandbytes package" in str(error)
    assert "CUDA" not in str(error)


@pytest.mark.parametrize(
    ("setting", "value", "allowed"),
    [
        ("dtype", "fp8", "auto, bfloat16, float16, float32"),
        ("device", "gpu", "auto, cpu, cuda"),
        ("quantize", "2bit", "none, 8bit, 4bit"),
    ],
)
def test_invalid_setting_names_the_setting_and_allowed_values(
    demo_dir: Path, setting: str, value: str, allowed: str
) -> None:
    error = load_error(str(demo_dir), **{setting: value})

    assert f"{setting}={value!r}" in str(error)
    assert allowed in str(error)


def test_explicit_half_dtype_on_cpu_is_allowed(demo_dir: Path) -> None:
    loaded = load_model(str(demo_dir), dtype="bfloat16", device="cpu")

    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_the_demo_model_writes_words_of_its_built_in_text_and_builds_quickly(tmp_path: Path) -> None:
    started = time.perf_counter()
    build_demo_model(tmp_path)
    assert time.perf_counter() - started < 90
    demo = load_model(str(tmp_path), device="cpu")
    prompt = demo.tokenizer("The baker lights the oven", return_tensors="pt")  # the README's curl example
    output = demo.model.generate(**prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    words = re.findall(r"[a-z]+", demo.tokenizer.decode(output[0, prompt["input_ids"].shape[1] :]).lower())
    known = set(re.findall(r"[a-z]+", _DEMO_CORPUS.lower()))
    assert len(words) >= 5 and sum(word in known for word in words) / len(words) >= 0.8, words
