"""On-disk vs in-memory IVF index builds: time, peak memory, query latency, recall.

A clustered gallery (mixture of 2,000 Gaussians, normalised) is written as an embedding store
of 50,000-row shards, then indexed from the store as `genattr index build` does, once per kind:
  ivf / ivfpq                  in memory (the reference)
  ivf-ondisk / ivfpq-ondisk    the same factory, lists merged on disk, --memory-budget bounded
Each build runs in a child process whose memory the parent samples every 20 ms from
/proc: peak anonymous memory (RssAnon: what the build itself holds) and peak total RSS
(adds file pages the build mapped: the store it reads and the files it writes; the kernel
reclaims those under pressure). Then, in this process, one query at a time (as `genattr
attribute` issues them), top-10: latency and recall@10 against the exact top-10.

    .venv/bin/python benchmarks/index_ondisk.py [--n 400000] [--dim 512] [--budget 256MB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attribute_speed import clustered, per_query_ms
from harness import emit_row, proc_status


def build_in_child(store: Path, out: Path, kind: str, budget: str) -> dict:
    """Build in a child process; peak RssAnon sampled here, VmHWM read at the end."""
    code = (
        "import json, sys, time, torch; torch.set_num_threads(1)\n"
        "from genattr.workflows.index import build_index_from_store\n"
        "t = time.perf_counter()\n"
        "build_index_from_store(sys.argv[1], sys.argv[2], kind=sys.argv[3], "
        "memory_budget=sys.argv[4])\n"
        "print('RESULT', json.dumps({'seconds': time.perf_counter() - t}), flush=True)\n"
        "input()\n"  # wait, so the parent can read the final VmHWM
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(store), str(out), kind, budget],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    peak_anon = 0
    result = None
    while result is None:
        peak_anon = max(peak_anon, proc_status(proc.pid).get("RssAnon", 0))
        if proc.poll() is not None:
            sys.exit(f"build of {kind} failed")
        line = _ready_line(proc)  # faiss prints to stdout too
        if line and line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
        time.sleep(0.02)
    result["peak_total_rss"] = proc_status(proc.pid).get("VmHWM", 0)
    result["peak_anon_rss"] = peak_anon
    proc.communicate("\n")
    return result


def _ready_line(proc: subprocess.Popen) -> str | None:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], 0)
    return proc.stdout.readline() if ready else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--budget", default="256MB", help="memory budget of the on-disk builds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from genattr.search.index import AttributionIndex
    from genattr.store import BackboneInfo, EmbeddingStore

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, args.dim)).astype(np.float32)
    queries = clustered(args.queries, args.dim, rng, centers)
    report: dict = {"gallery": [args.n, args.dim], "budget_ondisk": args.budget}
    with tempfile.TemporaryDirectory(prefix="genattr-ondisk-") as tmp_s:
        tmp = Path(tmp_s)
        store = EmbeddingStore.create(tmp / "store", BackboneInfo("synthetic"), args.dim)
        exact = (
            torch.full((args.queries, 10), -np.inf),
            torch.zeros((args.queries, 10), dtype=torch.long),
        )
        q = torch.from_numpy(queries)
        for start in range(0, args.n, 50_000):
            block = clustered(min(50_000, args.n - start), args.dim, rng, centers)
            store.append(block, [str(i) for i in range(start, start + len(block))])
            s, i = torch.topk(q @ torch.from_numpy(block).T, 10, dim=1)  # exact, blockwise
            both_s = torch.cat([exact[0], s], 1)
            both_i = torch.cat([exact[1], i + start], 1)
            top = both_s.topk(10, dim=1).indices
            exact = both_s.gather(1, top), both_i.gather(1, top)
        exact_ids = exact[1].numpy()
        del block
        report["store_mb"] = round(args.n * args.dim * 4 / 2**20)
        for base in ("ivf", "ivfpq"):
            for kind, budget in ((base, "64GB"), (f"{base}-ondisk", args.budget)):
                out = tmp / kind
                r = build_in_child(tmp / "store", out, kind, budget)
                index = AttributionIndex.load(out)
                ids = np.stack([index.search(x[None], 10)[1][0] for x in queries])
                hits = [len(set(a) & set(b)) for a, b in zip(ids, exact_ids, strict=True)]
                recall = np.mean(hits) / 10
                r.update(
                    factory=index.spec.factory,
                    nprobe=index.spec.nprobe,
                    query_ms=round(per_query_ms(lambda x, i=index: i.search(x, 10), queries), 2),
                    recall_at_10=round(float(recall), 4),
                    disk_mb=round(sum(f.stat().st_size for f in out.rglob("*")) / 2**20),
                )
                r["seconds"] = round(r["seconds"], 1)
                for key in ("peak_total_rss", "peak_anon_rss"):
                    r[key] = round(r[key] / 2**20)  # MiB
                report[kind] = r
                print(kind, json.dumps(r), flush=True)
                del index
            mem, disk = report[base], report[f"{base}-ondisk"]
            report[f"{base}: ondisk / in-memory"] = {
                k: round(disk[k] / mem[k], 2)
                for k in ("seconds", "peak_anon_rss", "peak_total_rss", "query_ms")
            }
            print(base, "ondisk / in-memory", report[f"{base}: ondisk / in-memory"], flush=True)
    print(json.dumps(report, indent=1))
    emit_row("index_ondisk", **report)


if __name__ == "__main__":
    main()
