"""Settings: CLI flags beat environment variables, which beat a TOML file, which beats the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import SettingsError, load_settings


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
        (["--api-keys-file", "/no/keys"], {}, "api_keys_file '/no/keys' is not a readable file"),
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
