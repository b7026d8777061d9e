"""Load on the web service: a bounded number of concurrent clients on loopback for a fixed time.

Starts `genattr serve` (a subprocess, torch at --threads) over the miniature world's gallery
index (built once into the cache, as `genattr serve` with no arguments does), then runs
--clients concurrent clients for --seconds, each posting real world images (held-out
`unused` clip art, 32 px PNG, as the world's generator makes them) to POST /attribute one after
another. Reports requests/s, p50/p99 latency, errors (must be 0), the mean batch size the
micro-batcher formed, and the CPU time per request of the server and of the clients (which
share the machine's cores with it). Reference, in the same run: the same images attributed by
a plain in-process `genattr.attribute()` loop (one image per call, index and backbone already
loaded, same thread count). Load and reference alternate in --rounds rounds, so a change in
the machine's other load hits both; the throughput ratio is the median over rounds, and CPU
time per request (less sensitive to other jobs) is compared too.

    nice -n 15 .venv/bin/python benchmarks/serve_load.py [--clients 8] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from genattr.attribution import attribute, backbone_for_index
from genattr.calibrate import Calibrator, save_calibrator
from genattr.search.index import AttributionIndex
from genattr.serve.world_index import default_world_index
from genattr.world.clipart import load_data
from harness import emit_row, health, served


async def load(url: str, images: list[bytes], clients: int, seconds: float, top_k: int):
    """`clients` loops posting images until the deadline; bounded in time and count."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        i = c
        while time.monotonic() < deadline:
            data = images[i % len(images)]
            i += clients
            t0 = time.perf_counter()
            try:
                r = await http.post(
                    "/attribute",
                    files={"image": ("q.png", data, "image/png")},
                    data={"top_k": str(top_k)},
                )
                ok = r.status_code == 200 and len(r.json()["results"]) == top_k
                if not ok:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    return np.array(latencies), errors, wall


def server_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def reference_round(files, index, calibrator, top_k, backbone, seconds):
    """Plain `attribute()` one image per call: latencies and CPU seconds of this process."""
    lat: list[float] = []
    cpu0 = time.process_time()
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        attribute([files[len(lat) % len(files)]], index, calibrator, top_k, backbone=backbone)
        lat.append(time.perf_counter() - t0)
    return lat, time.process_time() - cpu0


def ms(x: np.ndarray, q: float) -> float:
    return round(1000 * float(np.percentile(x, q)), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="of load, over all rounds")
    ap.add_argument("--reference-seconds", type=float, default=20.0, help="over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="load and reference alternate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, server and reference")
    ap.add_argument("--backbone", default=None, help="default: as `genattr serve`")
    ap.add_argument("--images", type=int, default=64, help="distinct query images")
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    index_path = default_world_index(args.backbone)
    data = load_data()
    rows = data.indices("unused")[: args.images]
    tmp = Path(tempfile.mkdtemp())
    files = []
    for r in rows:
        files.append(tmp / f"{r}.png")
        Image.fromarray(data.images[r]).save(files[-1])
    images = [f.read_bytes() for f in files]
    # The world has no fitted calibrator yet; a fixed one exercises the influence path.
    calibrator = Calibrator(inv_tau=60.0, bias=-50.0)
    save_calibrator(calibrator, tmp / "calibrator.json")
    index = AttributionIndex.load(index_path)
    backbone = backbone_for_index(index, None, "cpu")
    attribute([files[0]], index, calibrator, args.top_k, backbone=backbone)  # warm

    cmd = [sys.executable, "-m", "genattr.cli", "serve", "--index", str(index_path)]
    cmd += ["--calibrator", str(tmp / "calibrator.json"), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    lat, ref, errors, ratios = [], [], [], []
    wall = ref_wall = cpu = ref_cpu = client_cpu = 0.0
    with served(cmd, log=tmp / "server.log", env=env) as (proc, url):
        asyncio.run(load(url, images[:4], 1, 1.0, args.top_k))  # warm
        h0 = health(url)
        for _ in range(args.rounds):
            c0, k0 = server_cpu(proc.pid), time.process_time()
            r_lat, r_err, r_wall = asyncio.run(
                load(url, images, args.clients, args.seconds / args.rounds, args.top_k)
            )
            cpu += server_cpu(proc.pid) - c0
            client_cpu += time.process_time() - k0
            f_lat, f_cpu = reference_round(
                files, index, calibrator, args.top_k, backbone, args.reference_seconds / args.rounds
            )
            lat += list(r_lat)
            errors += r_err
            wall += r_wall
            ref += f_lat
            ref_wall += sum(f_lat)
            ref_cpu += f_cpu
            ratios.append((len(r_lat) / r_wall) / (len(f_lat) / sum(f_lat)))
        h1 = health(url)

    lat_a, ref_a = np.array(lat), np.array(ref)
    batches = h1["batches"] - h0["batches"]
    n_served = h1["requests"] - h0["requests"]
    report = {
        "gallery": {"images": h1["images"], "backbone": h1["backbone"], "kind": h1["index_kind"]},
        "clients": args.clients,
        "rounds": args.rounds,
        "threads": args.threads,
        "top_k": args.top_k,
        "service": {
            "seconds": round(wall, 1),
            "requests": len(lat_a),
            "requests_per_s": round(len(lat_a) / wall, 2),
            "p50_ms": ms(lat_a, 50),
            "p99_ms": ms(lat_a, 99),
            "errors": len(errors),
            "mean_batch": round(n_served / max(1, batches), 2),
            "server_cpu_ms_per_request": round(1000 * cpu / max(1, len(lat_a)), 1),
            "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, len(lat_a)), 1),
        },
        "reference_attribute_loop": {
            "seconds": round(ref_wall, 1),
            "calls": len(ref_a),
            "calls_per_s": round(len(ref_a) / ref_wall, 2),
            "p50_ms": ms(ref_a, 50),
            "p99_ms": ms(ref_a, 99),
            "cpu_ms_per_call": round(1000 * ref_cpu / len(ref_a), 1),
        },
        "throughput_ratio_per_round": [round(r, 2) for r in ratios],
        "throughput_ratio_median": round(float(np.median(ratios)), 2),
        "cpu_per_request_ratio": round((cpu / len(lat_a)) / (ref_cpu / len(ref_a)), 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=1))
    emit_row("serve_load", **report)
    if errors:
        print("errors:", *errors[:5], sep="\n  ")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
