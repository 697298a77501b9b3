"""Per-example attention (chatmask's CPU path for packed rows) vs one padded, batched sdpa call over the
examples, quiet and beside a busy process, on 2 threads and on 1: what slows chatmask's step on a busy CPU.

    python bench/attention_contention.py                       # 8 examples of 180-300 tokens
    python bench/attention_contention.py --lengths 100,400,250

SmolLM2-135M's attention shape (9 heads of 64), 30 layers' worth of forward + backward. Prints seconds
per case; the busy process is a Python loop started by the script on one core.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 600: pass"


def measure(lengths: list[int], threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    H, D, T = 9, 64, sum(lengths)
    F = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(1, H, T, D, requires_grad=True) for _ in range(3))

    def per_example(q, k, v):  # what attention._varlen_attention does on CPU
        parts = (x.split(lengths, dim=2) for x in (q, k, v))
        return torch.cat([F(a, b, c, is_causal=True) for a, b, c in zip(*parts)], dim=2)

    def batched(q, k, v):  # every example padded to the longest, one call (padding after each example)
        E, L = len(lengths), max(lengths)
        idx = torch.cat([torch.arange(n) + e * L for e, n in enumerate(lengths)])

        def pad(x):
            return x.new_zeros(H, E * L, D).index_copy(1, idx, x[0]).view(H, E, L, D).transpose(0, 1)

        o = F(pad(q), pad(k), pad(v), is_causal=True)  # (E, H, L, D)
        return o.transpose(0, 1).reshape(H, E * L, D).index_select(1, idx).unsqueeze(0)

    assert (per_example(q, k, v) - batched(q, k, v)).abs().max() < 1e-5
    out = {}
    for name, f in (("per-example", per_example), ("batched", batched)):
        for _ in range(2):
            f(q, k, v).sum().backward()
        t = time.perf_counter()
        for _ in range(30):
            f(q, k, v).sum().backward()
        out[name] = time.perf_counter() - t
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="180,220,260,200,240,190,300,210")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(measure(lengths, int(args.child))))
        return
    print(f"{'case':34} {'per-example s':>14} {'batched s':>10}")
    for busy in (False, True):
        p = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            for threads in (2, 1):
                r = subprocess.run([sys.executable, __file__, "--child", str(threads), "--lengths", args.lengths],
                                   capture_output=True, text=True, check=True)
                m = json.loads(r.stdout.strip().splitlines()[-1])
                case = f"{'beside a busy process' if busy else 'quiet'}, {threads} thread(s)"
                print(f"{case:34} {m['per-example']:14.2f} {m['batched']:10.2f}", flush=True)
        finally:
            if p is not None:
                p.kill()


if __name__ == "__main__":
    main()
