"""The service's memory under the worst legal uploads, and whether it keeps answering.

Starts `genattr serve` (a subprocess, torch at 1 thread) over the world gallery's index as
`genattr serve` with no arguments serves it (built once into the cache), waits until it is
idle, then fires --concurrency simultaneous uploads of one of the worst images the default
limits accept, per format (tests/server_process.py, `HOSTILE_UPLOADS`): one colour at the
largest pixel count allowed (16383 x 5461 = 89.5 M pixels, under Pillow's 89.48 M limit and
WebP's 16383 px side), a few hundred KB compressed, or 20 MB of a format stored raw; and an
ICO wrapping the worst 16-bit PNG (refused by format). One burst per --upload. Meanwhile a
normal client keeps posting a 32 px world image (and GET /healthz) one request after another.
Reports, from /proc/<pid>/status of the server: idle RSS, peak RSS (VmHWM, reset when idle)
and RSS after the burst; the burst's wall time and statuses; the normal requests' latencies
during the burst.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/serve_memory.py \
        [--upload png-gray16 webp-lossless-rgba ico-png-gray16 ...] [--concurrency 16]

--src DIR runs the server from another copy of the package (its `src` folder), e.g. the
code before the memory budget (commit 82858db) for a before/after comparison:

    mkdir /tmp/before && git archive 82858db src | tar -x -C /tmp/before && \\
        PYTHONPATH=. .venv/bin/python benchmarks/serve_memory.py --src /tmp/before/src
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tests.server_process import HOSTILE_UPLOADS

from genattr.calibrate import Calibrator, save_calibrator
from genattr.serve.world_index import default_world_index
from genattr.world.clipart import load_data
from harness import emit_row, health, reset_peak_rss, served, status_mb


class Sampler(threading.Thread):
    """RSS every `every` seconds while running: the curve, for when VmHWM cannot be reset."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic() - t0, status_mb(self.pid, "VmRSS")))
            except (OSError, KeyError):
                return
            time.sleep(self.every)


async def burst(
    url: str, worst: bytes, normal: bytes, concurrency: int, timeout: float, min_seconds: float
):
    """`concurrency` worst uploads at once (for at least `min_seconds`); a normal client
    posting and checking health one request after another until they are all answered.
    Statuses and latencies."""
    done = asyncio.Event()
    normal_lat: list[float] = []
    health_lat: list[float] = []
    normal_errors: list[str] = []

    async def heavy(http: httpx.AsyncClient, i: int) -> list[tuple[int, float, str]]:
        """One slot of the burst: the worst upload, sent again as soon as it is answered
        until `min_seconds` have passed (refused uploads come back at once)."""
        sent: list[tuple[int, float, str]] = []
        while not sent or time.perf_counter() < start + min_seconds:
            t0 = time.perf_counter()
            try:
                r = await http.post(
                    "/attribute", files={"image": (f"worst{i}.png", worst, "image/png")}
                )
                sent.append((r.status_code, time.perf_counter() - t0, r.text[:200]))
            except httpx.HTTPError as e:
                sent.append((-1, time.perf_counter() - t0, repr(e)))
        return sent

    async def normal_client(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.3)  # the burst is in the server by then
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                r = await http.get("/healthz")
                health_lat.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = await http.post(
                    "/attribute",
                    files={"image": ("normal.png", normal, "image/png")},
                    data={"top_k": "5"},
                )
                normal_lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    normal_errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                normal_errors.append(repr(e))
            await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with (
        httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http,
        httpx.AsyncClient(base_url=url, timeout=timeout) as side,
    ):
        start = time.perf_counter()
        side_task = asyncio.create_task(normal_client(side))
        slots = await asyncio.gather(*(heavy(http, i) for i in range(concurrency)))
        results = [r for slot in slots for r in slot]
        wall = time.perf_counter() - start
        done.set()
        await side_task
    return results, wall, normal_lat, health_lat, normal_errors


def measure(args, cmd: list[str], env: dict, tmp: Path, worst: bytes, normal: bytes) -> dict:
    with served(cmd, log=tmp / "server.log", env=env, timeout=900) as (proc, url):
        for _ in range(5):  # warm: first batch, thread pools, allocator
            with httpx.Client(base_url=url, timeout=60) as c:
                c.post("/attribute", files={"image": ("n.png", normal, "image/png")})
        time.sleep(1.0)
        idle = status_mb(proc.pid, "VmRSS")
        reset_peak_rss(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        results, wall, normal_lat, health_lat, normal_errors = asyncio.run(
            burst(url, worst, normal, args.concurrency, args.timeout, args.min_seconds)
        )
        sampler.stop.set()
        sampler.join()
        peak = max(status_mb(proc.pid, "VmHWM"), max(r for _, r in sampler.samples))
        after = {}
        for at, wait in ((0.5, 0.5), (5.0, 4.5)):
            time.sleep(wait)
            after[at] = status_mb(proc.pid, "VmRSS")
        h = health(url)
    statuses: dict[int, int] = {}
    for status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    lat = np.array(normal_lat) if normal_lat else np.array([np.nan])
    return {
        "idle_rss_mb": round(idle),
        "peak_rss_mb": round(peak),
        "peak_above_idle_mb": round(peak - idle),
        "after_burst_above_idle_mb": {f"{k}s": round(v - idle) for k, v in after.items()},
        "burst_wall_s": round(wall, 1),
        "worst_statuses": statuses,
        "worst_latency_s": [round(t, 1) for _, t, _ in sorted(results, key=lambda r: r[1])],
        "worst_errors": sorted({text for s, _, text in results if s != 200})[:3],
        "normal_requests_during_burst": len(normal_lat),
        "normal_latency_ms": {
            "p50": round(1000 * float(np.median(lat))),
            "max": round(1000 * float(np.max(lat))),
        },
        "health_latency_ms_max": round(1000 * max(health_lat)) if health_lat else None,
        "normal_errors": normal_errors[:3],
        "memory_budget": h.get("memory"),
        "rss_curve_mb": [
            (round(t, 1), round(r))
            for t, r in sampler.samples[:: max(1, len(sampler.samples) // 40)]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--upload", nargs="+", choices=sorted(HOSTILE_UPLOADS), default=["png-gray16"],
        help="worst uploads to send, one burst each (tests/server_process.py)",
    )  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--index", default=None, help="default: as `genattr serve` with no --index")
    ap.add_argument("--src", default=None, help="run the server from this src/ folder")
    ap.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    ap.add_argument(
        "--min-seconds", type=float, default=5.0, help="keep every slot of the burst busy so long"
    )
    args = ap.parse_args()

    index = args.index or str(default_world_index())
    tmp = Path(tempfile.mkdtemp())
    save_calibrator(Calibrator(inv_tau=60.0, bias=-50.0), tmp / "calibrator.json")
    data = load_data()
    buf = io.BytesIO()
    Image.fromarray(data.images[int(data.indices("unused")[0])]).save(buf, format="PNG")
    normal = buf.getvalue()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([args.src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "genattr.cli", "serve", "--index", index]
    cmd += ["--calibrator", str(tmp / "calibrator.json"), "--threads", "1"]
    rows = []
    for name in args.upload:
        worst = HOSTILE_UPLOADS[name]()
        m = measure(args, cmd, env, tmp, worst, normal)
        report = {
            "server": args.src or "this checkout",
            "index": index,
            "upload": {"name": name, "bytes": len(worst)},
            "concurrency": args.concurrency,
            **m,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps(report, indent=1), flush=True)
        emit_row("serve_memory", **report)
        statuses = ", ".join(f"{n} x {s}" for s, n in sorted(m["worst_statuses"].items()))
        rows.append(
            f"| {name} | {len(worst) / 1e3:,.0f} KB | {statuses} | {m['idle_rss_mb']} MB | "
            f"{m['peak_above_idle_mb']} MB | {m['burst_wall_s']} s | "
            f"{m['normal_requests_during_burst']} | {m['normal_latency_ms']['p50']} / "
            f"{m['normal_latency_ms']['max']} ms |"
        )
    print("| upload | file | statuses | idle RSS | peak above idle | burst | normal requests "
          "| their latency p50 / max |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
