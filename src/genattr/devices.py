"""The one reading of a `--device` option: a device that is asked for and missing is an error,
never a silent fall back to the CPU."""

from __future__ import annotations

import torch

from genattr.errors import GenattrError


def resolve_device(device: str = "auto") -> str:
    """'cpu', 'cuda' or 'cuda:N' checked against what torch sees; 'auto' is the first CUDA GPU
    when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise GenattrError(f"--device must be cpu, cuda, cuda:N or auto, not {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise GenattrError(f"--device {device}: no CUDA GPU is visible to torch")
        if colon and int(index) >= torch.cuda.device_count():
            raise GenattrError(
                f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return device
