"""Memory each accepted upload format really takes to decode, against what the service
reserves for it (`genattr.data.images.decoded_bytes`).

For each accepted format's worst legal upload at the default limits (tests/server_process.py,
`WORST_UPLOADS`: 89.5 M pixels where the format compresses, the 20 MB upload limit where it
does not), in a fresh process: the peak RSS above the start of decoding (VmHWM, reset first)
while `decode_rgb` decodes it to the service's working size (2,048 px), beside the
reservation. The reservation must not be below the peak: the budget is a bound.

    .venv/bin/python benchmarks/decode_peaks.py [--only webp-lossless-rgba ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.server_process: the worst uploads


def main() -> None:
    from tests.server_process import WORST_UPLOADS, decode_peak

    from harness import emit_row

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(WORST_UPLOADS))
    args = ap.parse_args()
    print("| upload | format, mode | pixels | file | peak MB | reserved MB | reserved / peak |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or WORST_UPLOADS:
        data = WORST_UPLOADS[name]()
        m = decode_peak(data)
        w, h = m["size"]
        print(
            f"| {name} | {m['format']} {m['mode']} | {w}x{h} | {len(data) / 1e3:,.0f} KB | "
            f"{m['peak_mb']:.0f} | {m['reserved_mb']:.0f} | "
            f"{m['reserved_mb'] / max(m['peak_mb'], 1):.2f} |",
            flush=True,
        )
        emit_row("decode_peaks", upload=name, bytes=len(data), **m)


if __name__ == "__main__":
    main()
