"""How long `chatmask demo` takes, end to end, as a new user runs it: the number the README states.

    python bench/demo_time.py                 # runs `chatmask demo --out <tmp>` once, then prints the time
    python bench/demo_time.py --runs 2        # twice (report the spread; run it alone on a quiet machine)
    python bench/demo_time.py -- --steps 8    # anything after -- goes to `chatmask demo`

Needs chatmask importable (pip install -e . from the README).

Prints one line per run and last `demo_seconds=<median> peak_rss_gb=<max>`. The GGUF conversion is
done before the first timed run (a first run ever also pays it, about 20 s; the README says so).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(extra: list[str], folder: str) -> tuple[float, float]:
    """(seconds, peak RSS of the demo process in GB) for one `chatmask demo` with a cache of its own (nothing
    prepared before, as for a new user) that shares only the converted model."""
    from chatmask.paths import cache_dir

    cache = os.path.join(folder, "cache")
    os.makedirs(cache)
    os.symlink(cache_dir() / "models", os.path.join(cache, "models"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "chatmask", "demo", "--out", os.path.join(folder, "demo"), *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, "CHATMASK_CACHE": cache})
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"chatmask demo failed (exit {r.returncode}):\n{r.stdout[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the largest child so far
    last = [line for line in r.stdout.splitlines() if line.strip()][-3:]
    print("\n".join("  | " + line for line in last))
    return seconds, max(peak, before) / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="timed runs (default: 1)")
    ap.add_argument("demo_args", nargs="*", help="arguments for `chatmask demo` (after --)")
    args = ap.parse_args(argv)
    # the one-time conversion of the GGUF, outside the timing
    subprocess.run([sys.executable, "-c", "from chatmask.models import load_model; from chatmask.hub import "
                    "load_tokenizer; load_model('smollm2'); load_tokenizer('smollm2')"], check=True)
    times, peak = [], 0.0
    for k in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            seconds, rss = run_once(args.demo_args, d)
        times.append(seconds)
        peak = max(peak, rss)
        print(f"run {k + 1}: {seconds:.0f} s ({int(seconds // 60)} min {seconds % 60:.0f} s)", flush=True)
    print(f"demo_seconds={statistics.median(times):.0f} peak_rss_gb={peak:.1f}")


if __name__ == "__main__":
    main()
