"""One configuration file for server, edge, monitor, relay and load generator, every key overridable.

Format: YAML with one section per component (``server``, ``edge``, ``monitor``, ``relay``, ``loadtest``); keys
are the command's flag names with underscores (``max_batch: 32`` for ``--max-batch``). Precedence, highest first:
command-line flag > environment variable ``SPLITINFER_<SECTION>_<KEY>`` (e.g. ``SPLITINFER_SERVER_PORT=50051``)
> file (``--config FILE`` or ``SPLITINFER_CONFIG``) > built-in default. The keys are read off the argument
parser itself, so a flag and its key cannot drift apart, and an unknown key is an error that names it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

SECTIONS = {"serve": "server", "edge": "edge", "monitor": "monitor", "relay": "relay", "loadtest": "loadtest"}
NOT_KEYS = {"help", "config", "func", "command"}
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the source and the key."""


def settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in NOT_KEYS and a.option_strings}


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE | FALSE:
            return text in TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [v for v in str(value).replace(",", " ").split() if v]
        return [str(v) for v in items]
    if isinstance(value, dict | list):
        raise ConfigError(f"{where}: expected a single value, got {type(value).__name__}")
    try:
        out = action.type(value) if callable(action.type) else (value if value is None else str(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from exc
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{where}: {out!r} is not one of {sorted(action.choices)}")
    return out


def read_file(path: str | os.PathLike) -> dict[str, dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: expected sections {sorted(SECTIONS.values())} at the top level")
    unknown = set(doc) - set(SECTIONS.values())
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {sorted(unknown)}; "
                          f"known: {sorted(SECTIONS.values())}")
    for name, sec in doc.items():
        if not isinstance(sec, dict | None):
            raise ConfigError(f"config file {path}: section {name} must be a mapping")
    return {k: v or {} for k, v in doc.items()}


def overrides(parser: argparse.ArgumentParser, section: str, path: str | None, environ: Mapping[str, str]
              ) -> dict[str, Any]:
    """Values for ``parser``'s flags from the file's ``section`` and the environment (env wins)."""
    actions = settable(parser)
    out: dict[str, Any] = {}
    if path:
        for key, value in read_file(path).get(section, {}).items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                raise ConfigError(f"config file {path}: {section}.{key} is not a setting; known: {sorted(actions)}")
            out[dest] = _convert(actions[dest], value, f"config file {path}: {section}.{key}")
    prefix = f"SPLITINFER_{section.upper()}_"
    for var, value in environ.items():
        if var.startswith(prefix):
            dest = var[len(prefix):].lower()
            if dest not in actions:
                raise ConfigError(f"environment variable {var} names no setting of {section}; known: "
                                  f"{sorted(actions)}")
            out[dest] = _convert(actions[dest], value, f"environment variable {var}")
    return out


def config_path(argv: list[str], environ: Mapping[str, str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return environ.get("SPLITINFER_CONFIG")


def apply(subparsers: dict[str, argparse.ArgumentParser], argv: list[str], environ: Mapping[str, str]) -> None:
    """Install file/env values as the chosen subcommand's defaults (flags given on the command line still win)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SECTIONS or command not in subparsers:
        return
    sub = subparsers[command]
    values = overrides(sub, SECTIONS[command], config_path(argv, environ), environ)
    actions = settable(sub)
    for dest in values:
        actions[dest].required = False  # supplied by the file or the environment
    sub.set_defaults(**values)


def effective(subparsers: dict[str, argparse.ArgumentParser], path: str | None, environ: Mapping[str, str]
              ) -> dict[str, dict[str, Any]]:
    """Every section with its keys' effective values (defaults, then file, then environment)."""
    out = {}
    for command, section in SECTIONS.items():
        if command not in subparsers:
            continue
        sub = subparsers[command]
        vals = {dest: a.default for dest, a in settable(sub).items()}
        vals |= overrides(sub, section, path, environ)
        out[section] = vals
    return out
