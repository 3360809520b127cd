"""Settings: CLI flags beat environment variables, which beat a TOML file, which beats the defaults; the
engine's part reaches the engine whole."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trickle.config import Settings, SettingsError, load_settings
from trickle.generation.engine_config import DEFAULT_MAX_SEQ_LEN, EngineConfig


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "trickle.toml"
    path.write_text('port = 9000\nmodel = "from-toml"\nmax_batch_size = 4\n')
    return path


def test_defaults_serve_falcon_on_8080(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings([])
    assert settings.model == "tiiuae/falcon-7b-instruct" and settings.port == 8080


def test_precedence_cli_then_env_then_toml(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRICKLE_PORT", "9100")
    monkeypatch.setenv("TRICKLE_MODEL", "from-env")
    settings = load_settings(["--config", str(toml_file), "--model", "from-cli"])
    assert (settings.model, settings.port, settings.max_batch_size) == ("from-cli", 9100, 4)


def test_toml_file_named_by_the_environment(toml_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRICKLE_CONFIG", str(toml_file))
    assert load_settings([]).port == 9000


def test_api_keys_from_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRICKLE_API_KEYS", "one, two,,")
    assert load_settings([]).all_api_keys() == ["one", "two"]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            ["--port", "70000"],
            {},
            "invalid setting 'port': Input should be less than or equal to 65535 (got '70000')",
        ),
        ([], {"TRICKLE_DTYPE": "fp8"}, "invalid setting 'dtype'"),
        (
            ["--config", "/no/such.toml"],
            {},
            "invalid setting 'config': '/no/such.toml' is not a readable file",
        ),
        (
            ["--prefill-pacing", "0.5"],
            {},
            "invalid setting 'prefill_pacing': must be 0 (off) or more than 1",
        ),
        (
            ["--api-keys-file", "/no/keys"],
            {},
            "invalid setting 'api_keys_file': not a readable file (got '/no/keys')",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(
    argv: list[str], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(argv)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_broken_toml_file_is_one_line_naming_config(tmp_path: Path) -> None:
    broken = tmp_path / "trickle.toml"
    broken.write_text("port = [broken\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(["--config", str(broken)])
    assert str(caught.value).startswith(f"invalid setting 'config': '{broken}' is not valid TOML: ")
    assert "\n" not in str(caught.value)


def cold_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`python server.py ARGS` in a fresh interpreter, and how long it took."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args], capture_output=True, text=True, timeout=60
    )
    return result, time.perf_counter() - started


def test_help_version_and_a_bad_setting_answer_within_two_seconds_from_a_cold_start() -> None:
    shown, took = cold_cli("--help")
    assert shown.returncode == 0 and took < 2.0
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in shown.stdout and f"TRICKLE_{name.upper()}" in shown.stdout
    assert "{Path,null}" not in shown.stdout and "list[str]" not in shown.stdout
    version, took = cold_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("trickle ") and took < 2.0
    bad, took = cold_cli("--port", "70000")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and took < 2.0
    assert "torch" not in bad.stderr


def test_the_engine_takes_its_settings_whole_under_the_same_names_and_defaults() -> None:
    """Every engine field but the KV block size is a setting of the same name and default, and each
    setting given reaches the engine as given; an unset max_seq_len is the model's context length."""
    engine_fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    del engine_fields["kv_block_size"]
    settings_fields = Settings.model_fields
    for name, default in engine_fields.items():
        assert name in settings_fields, name
        if name != "max_seq_len":  # the settings' None: the model's context length
            assert settings_fields[name].default == default, name
    given = Settings(
        max_batch_size=3,
        max_seq_len=300,
        prefill_token_budget=77,
        kv_cache_tokens=4096,
        prefix_cache=False,
        gpu_memory_utilization=0.5,
        cuda_graphs=False,
        compile=False,
        max_queue=9,
        request_timeout=12.0,
    )
    config = EngineConfig.from_settings(given, context=8192)
    assert {name: getattr(config, name) for name in engine_fields} == {
        name: getattr(given, name) for name in engine_fields
    }
    assert EngineConfig.from_settings(Settings(), context=8192).max_seq_len == 8192
    assert EngineConfig.from_settings(Settings(), context=None).max_seq_len == DEFAULT_MAX_SEQ_LEN
