"""One-line messages for validation errors in user files (workloads, hardware, profiles)."""

from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(source: str, err: ValidationError) -> str:
    """``source: field.path: what is wrong (got value)`` for the first error pydantic found."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    where = f"{source}: {loc}" if loc else source  # a whole-file check names no field
    return f"{where}: {msg}{shown}"
