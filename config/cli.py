"""The command line: `--help`, `--version` and a bad setting are answered before anything heavy is
imported (torch and transformers take seconds to import); only valid settings go on to the server."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trickle.config.settings import ENV_PREFIX, Settings, SettingsError, load_settings

SUMMARY = "Stream text from a Hugging Face causal LM over Server-Sent Events, from one GPU, to many clients."
# Defaults that a value cannot say by itself.
DEFAULT_WORDS = {"max_seq_len": "the model's context length", "kv_cache_tokens": "what memory leaves"}


def version() -> str:
    try:
        return importlib.metadata.version("trickle")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Answer --help and --version, or parse the settings and serve. Errors a user can fix are one line
    on stderr: exit 2 for a setting, 1 for a model that cannot be loaded."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"trickle {version()}")
        return 0
    if "-h" in args or "--help" in args:
        print(help_text())
        return 0
    try:
        settings = load_settings(args)
    except SettingsError as err:
        print(f"trickle: {err}", file=sys.stderr)
        return 2
    from trickle.server import run  # the server itself: torch, transformers, the model code

    return run(settings)


def help_text() -> str:
    """Every setting: its flag, its environment variable, its default and what it does."""
    lines = [
        "usage: trickle [--setting VALUE ...]",
        "",
        SUMMARY,
        "",
        "Every setting is a flag, an environment variable, or a line of the --config TOML file (flags win",
        "over variables, which win over the file).",
        "",
        "  -h, --help     show this help and exit",
        "  --version      show the version and exit",
        "",
    ]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        usage = (
            f"{flag} / --no-{flag[2:]}"
            if field.annotation is bool
            else f"{flag} {_placeholder(field.annotation)}"
        )
        default = DEFAULT_WORDS.get(name, _words(field.get_default(call_default_factory=True)))
        lines.append(f"  {usage}")
        lines.append(f"      {ENV_PREFIX}{name.upper()}, default: {default}")
        lines += textwrap.wrap(" ".join((field.description or "").split()), 96, initial_indent="      ",
                               subsequent_indent="      ")  # fmt: skip
    return "\n".join(lines)


def _placeholder(annotation: Any) -> str:
    choices = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(str(c) for c in choices) + "}"
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _placeholder(next(a for a in choices if a is not type(None)))
    if typing.get_origin(annotation) is typing.Annotated or typing.get_origin(annotation) is list:
        return "KEY,KEY,..."
    return {int: "N", float: "X", str: "TEXT", Path: "PATH"}.get(annotation, "VALUE")


def _words(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
