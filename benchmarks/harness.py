"""What the scripts in benchmarks/ and experiments/ share: wall time, peak memory, torch threads,
one JSON row per result (with the machine and the commit), the web service started on a free
port and waited on, and an SD-1.x-shaped pipeline built from configs.

A script in benchmarks/ imports it as a sibling (`from harness import timed`: Python puts a
script's own folder on sys.path); a script in experiments/ puts benchmarks/ there first:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MB = 2**20


# -- time and threads --------------------------------------------------------------------------
def timed(
    fn: Callable[[], object], *, repeat: int = 1, warmup: int = 0, sync_device: Any = None
) -> float:
    """Seconds of `fn()`: the best of `repeat` calls (the machine is shared: the minimum is the
    least noisy) after `warmup` untimed ones. With `sync_device` on CUDA, the device is
    synchronised before each clock reading, so queued kernels are counted."""
    import torch

    def sync() -> None:
        if sync_device is not None and str(sync_device).startswith("cuda"):
            torch.cuda.synchronize(sync_device)

    for _ in range(warmup):
        fn()
    sync()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch at `n` threads inside the block (None: as it is), restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- memory ------------------------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The sizes in /proc/<pid>/status (VmRSS, VmHWM, RssAnon, ...), in bytes; {} once the
    process is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.endswith(" kB"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def status_mb(pid: int | str, field: str) -> float:
    """One size of /proc/<pid>/status (VmRSS, VmHWM, ...) in MB; KeyError if there is none."""
    return proc_status(pid)[field] / MB


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's peak resident memory (VmHWM) in MB, since it started or since
    `reset_peak_rss`."""
    return status_mb(pid, "VmHWM")


def reset_peak_rss(pid: int | str = "self") -> None:
    """Start VmHWM again from the current RSS (Linux: 5 > clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_cuda_mb(device: Any = None) -> float | None:
    """Peak CUDA memory torch allocated on `device` (its current one by default) in MB, since
    it started or since `torch.cuda.reset_peak_memory_stats`; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / MB


# -- results -----------------------------------------------------------------------------------
@functools.cache
def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and GPU name (None without one) of this machine."""
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": None, "gpu": None}
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@functools.cache
def commit() -> str | None:
    """`git rev-parse --short HEAD` of this checkout, or None outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _plain(x: Any) -> Any:
    """`x` as strict JSON takes it: numpy values as Python's, NaN and infinities as null."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return _plain(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def emit_row(name: str, **fields: Any) -> dict[str, Any]:
    """Print one result as one JSON line on stdout: {"name", "commit", "machine", **fields}
    (`grep '^{"name"'` collects them); returns it."""
    row = {"name": name, "commit": commit(), "machine": machine(), **_plain(fields)}
    print(json.dumps(row, allow_nan=False), flush=True)
    return row


# -- the web service ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str, timeout: float = 30) -> dict:
    """The service's GET /healthz document."""
    with urllib.request.urlopen(url + "/healthz", timeout=timeout) as r:
        return json.load(r)


def wait_healthy(
    url: str, proc: subprocess.Popen, *, log: Path | None = None, timeout: float = 300
) -> None:
    """Until GET /healthz answers; exits (with the end of `log`) if the server stops first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f":\n{log.read_text()[-3000:]}" if log is not None else ""
            raise SystemExit(f"server exited with {proc.returncode}{tail}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("server did not become healthy")


@contextlib.contextmanager
def served(
    cmd: list[str], *, log: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`cmd` (`genattr serve ...` without --port) on a free loopback port, its output in `log`,
    healthy when the block starts and stopped when it ends: yields (process, base URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            wait_healthy(url, proc, log=log, timeout=timeout)
            yield proc, url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- models ------------------------------------------------------------------------------------
# Sizes of `sd_pipeline`: UNet, VAE and CLIP text encoder settings. "tiny" is the tests'
# pipeline (tests/tiny_sd.py: 16x16x4 latents, 10,240 cross-attention key/value weights; same
# seed, same weights); "sd1" is Stable Diffusion 1.x; "small", a cut-down sd1 for CPU smoke runs.
SD_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {"sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64),
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                 "cross_attention_dim": 32, "norm_num_groups": 8},
        "vae": {"block_out_channels": (16, 32), "norm_num_groups": 8, "sample_size": 32},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4},
    },
    "small": {
        "unet": {"sample_size": 64, "block_out_channels": (32, 64, 64, 64), "norm_num_groups": 16,
                 "cross_attention_dim": 64},
        "vae": {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 16, "sample_size": 512},
        "text": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4},
    },
    "sd1": {
        "unet": {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280),
                 "norm_num_groups": 32, "cross_attention_dim": 768},
        "vae": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32,
                "sample_size": 512},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12},
    },
}  # fmt: skip


def sd_pipeline(size: str = "tiny", seed: int = 0) -> Any:
    """A Stable-Diffusion-shaped pipeline of `SD_SIZES[size]` built from configs (random
    weights, seeded; float32 on the CPU), with a character-level CLIP tokenizer that works
    offline (every printable character, plain and word-final; no merges)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from genattr.world.tokenizer import make_tokenizer, word_vocab

    shape = SD_SIZES[size]
    tokenizer = make_tokenizer(*word_vocab([]), max_length=77)  # no words: characters only
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(attention_head_dim=8, **shape["unet"])
    n = len(shape["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        **shape["vae"],
    )
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, **special, **shape["text"]
        )
    )
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    return StableDiffusionPipeline(
        **parts,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
