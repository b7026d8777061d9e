"""Typed options from a user's mapping (a plan's `train:` / `sample:`, YAML, JSON).

pydantic checks every value against the dataclass's annotations and their constraints when
the mapping is read, so `max_train_steps: lots` or `steps: -3` stops there, naming the
option, and not after a large model has loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from genattr.errors import GenattrError

T = TypeVar("T")


def options_from_mapping(cls: type[T], values: Mapping[str, Any] | None, what: str) -> T:
    """`cls` (a dataclass) from `values`; unknown keys and ill-typed values are GenattrErrors."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise GenattrError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(part) for part in err["loc"])
        raise GenattrError(
            f"{what} option {name}: {err['msg'].lower()} (got {err.get('input')!r})"
        ) from None
