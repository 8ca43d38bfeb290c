"""Reading the user's files (workloads, hardware and cluster descriptions, profiles, plans) and
one-line messages for what is wrong in them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError


def format_validation_error(
    source: str, err: ValidationError, tags: tuple[str, ...] = ()
) -> str:
    """``source: field.path: what is wrong (got value)`` for the first error pydantic found;
    ``tags``: the names of a tagged union's members, left out of the field path."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if x not in tags)
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    where = f"{source}: {loc}" if loc else source  # a whole-file check names no field
    return f"{where}: {msg}{shown}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names one key twice (plain YAML keeps the
    last, so a repeated component would silently replace the first)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_user_file(
    path: Path, kind: Literal["yaml", "toml", "json"], error: type[ValueError]
) -> Any:
    """The parsed content of a user's file; every failure (missing, unreadable, not UTF-8
    text, malformed, a key given twice) is ``error`` with one line naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a UTF-8 text file (byte 0x{raw[err.start]:02x} at offset"
                    f" {err.start})") from None
    try:
        if kind == "toml":
            return tomllib.loads(text)
        if kind == "json":
            return json.loads(text, object_pairs_hook=_json_object)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON: {err.msg} at line {err.lineno}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, yaml.MarkedYAMLError) and err.problem:
            first = f"{err.problem} (line {err.problem_mark.line + 1})" if err.problem_mark \
                else err.problem
        raise error(f"{path}: malformed {kind.upper()}: {first}") from None
