"""Where a run runs: the accelerator and the CPU threads.

`accelerator()` builds accelerate's Accelerator for this process (on CPU when there is no GPU, XPU or MPS);
`command_threads(cfg, say)` is the command line's one choice of CPU threads before training (`cpu_threads`:
one per core other processes leave free, or --threads). Needs torch, never the training loop.
"""

from __future__ import annotations

import os
import time

import torch


def no_device() -> bool:
    """True when there is no GPU, XPU or MPS: accelerate only sets up multi-process CPU (gloo) under
    torchrun when told it runs on CPU."""
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not torch.cuda.is_available() and not xpu and not torch.backends.mps.is_available()


def accelerator():
    """accelerate's Accelerator with the mixed precision `accelerate launch` asked for, else none (chatmask
    sets the weights' dtype itself). accelerate keeps one state per process, so a Trainer run earlier in the
    same process with bf16 would otherwise make this run autocast to bf16 without a word; that state is
    reset (the process group is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = no_device()
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    try:
        return Accelerator(cpu=cpu, mixed_precision=mp)
    except ValueError:
        AcceleratorState._reset_state()
        return Accelerator(cpu=cpu, mixed_precision=mp)


def _cpu_times() -> tuple[int, int, int]:
    """(every core's jiffies, their idle ones, this process's own) from /proc (Linux)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:  # this process's own threads (torch's spin-waiting ones too)
        own = f.read().rsplit(")", 1)[1].split()
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0), int(own[11]) + int(own[12])


def busy_cores_elsewhere(seconds: float = 0.1, sample=_cpu_times) -> float | None:
    """How many cores other processes keep busy, from two `sample()`s of /proc/stat `seconds` apart while
    this process waits (Linux; None elsewhere)."""
    try:
        t0, i0, o0 = sample()
        time.sleep(seconds)
        t1, i1, o1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    busy = (total - (i1 - i0)) - (o1 - o0)  # every core's busy jiffies, less this process's
    return max(0.0, (os.cpu_count() or 1) * busy / total) if total > 0 else None


def threads_for(busy: float | None, cores: int, have: int) -> int:
    """Threads to train on: one per core that other processes (`busy` cores of `cores`) leave free, at most
    the `have` torch has and at least one; `have` on a quiet machine (under 0.75 busy cores) or unknown load."""
    if busy is None or busy < 0.75:
        return have
    return max(1, min(have, cores - round(busy)))


def cpu_threads(cfg, say) -> None:
    """--threads, or one thread per core other processes leave free (`threads_for`): with two threads on two
    cores and another busy process, chatmask's step ran 1.75x slower than on one thread (bench/README.md).
    The command line calls it once, before training; `train()` itself only applies an explicit --threads (a
    library call does not change the process's thread count behind its caller's back)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return
    busy = busy_cores_elsewhere()
    have = torch.get_num_threads()
    free = threads_for(busy, os.cpu_count() or have, have)
    if free < have:
        torch.set_num_threads(free)
        say(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: training on {free} thread(s) "
            f"instead of {have} (--threads N to choose)")


def command_threads(cfg, say) -> None:
    """The command line's choice: on CPU in one process, `cpu_threads`; under torchrun / accelerate
    launch each process's threads are theirs to choose, and on a GPU the CPU threads barely matter."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return
    if no_device():
        cpu_threads(cfg, say)
