"""The one exception type users see: the CLI prints its message and exits with code 2."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class GenattrError(Exception):
    """Bad input or an unusable file; the message names the file and the problem."""


def validation_reason(e: ValidationError) -> str:
    """pydantic's first complaint as 'field.path: message', for a one-line GenattrError."""
    err = e.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def check_count(value: int, option: str, minimum: int) -> None:
    """A count option (threads, workers, ...) below its minimum is bad input, said in one line;
    checked where the option comes in, before anything is created."""
    if value < minimum:
        least = "0 or more" if minimum == 0 else f"at least {minimum}"
        raise GenattrError(f"{option} must be {least}, got {value}")


# The package extra (pyproject.toml) that installs each optional top-level module.
EXTRA_OF_MODULE = {
    "faiss": "index",
    "diffusers": "customize",
    "accelerate": "customize",
    "sentence_transformers": "text",
    "matplotlib": "plots",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "h11": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "ray": "ray",
}


def missing_extra(e: ImportError) -> str | None:
    """The one line to say when an optional module is not installed, or None when `e` is not
    about one of genattr's extras."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return f"this needs {top}, from genattr's '{extra}' extra: pip install 'genattr[{extra}]'"
