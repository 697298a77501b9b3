"""What a long run survives: a signal (the step under way finished and saved, then a clean exit), a second run
into the same folder (a lock the kernel drops with its holder), and a loss that is no longer finite.

`train` holds `run_lock(out)` and `Signals()` around its loop and raises `non_finite(...)` instead of a step
whose loss or gradient is not finite; `Interrupted` carries a signal out to the command (exit 128 + its number).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path

from .errors import ChatmaskError, ConfigError

LOCK = ".chatmask.lock"
"""The file in a run folder a running `train` holds an exclusive flock on (its pid and start time inside)."""


class Interrupted(Exception):
    """A run stopped by SIGTERM / SIGINT after its step under way, saved at `checkpoint`."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint} written" if checkpoint else "nothing to save yet (no step done)"
        super().__init__(f"stopped by {name} after step {step}: {saved}")


class NonFinite(ChatmaskError):
    """A step's loss or gradient is NaN or infinite; the step was not applied."""


class Signals:
    """Inside the block, the first SIGTERM or SIGINT is noted (`received`) for the loop to act on at the end of
    its step; a second one of either ends the process at once, as if no handler were set. Outside the main
    thread (signals reach only it) nothing is installed."""

    NAMES = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._before: dict = {}

    def _note(self, signum, frame) -> None:
        if self.received is not None:  # the second: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"\nchatmask: {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for s in self.NAMES:
                self._before[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._before.items():
            signal.signal(s, h)
        self._before.clear()


@contextlib.contextmanager
def run_lock(out: Path, main_process: bool = True):
    """An exclusive lock on `out` for the block (the main process takes it): a second `train` into the folder
    is refused with who holds it. A flock, so a killed holder leaves nothing behind that binds (its file is
    taken over); the file goes when the block ends. Where the filesystem has no locks the run goes unlocked."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created if missing)")
    if not main_process:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    f = _locked(path, out)
    try:
        yield
    finally:
        if f is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still held: a run that opened it meanwhile sees it gone and takes a new one
            f.close()


def _locked(path: Path, out: Path):
    """The open lock file of `path`, flocked and still the one at `path` (None where flock is not supported)."""
    import fcntl

    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            held = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{out} is in use by a running chatmask run ({held}); wait for it to end, or pass "
                              "another --out") from None
        except OSError:  # no locks on this filesystem
            f.close()
            return None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            return f
        f.close()  # its holder removed it as we opened it: take the new one


def received(acc, signals: Signals | None) -> int:
    """The signal any process of the run received (0: none), the same on every process."""
    got = (signals.received if signals else None) or 0
    if acc.num_processes > 1:
        import torch

        got = int(acc.reduce(torch.tensor(got, device=acc.device), "max"))
    return got


def sources(ds, rows: list[int]) -> list[str]:
    """Where these rows of a prepared dataset came from (file:line), as prepare recorded it."""
    return list(ds.select(rows)["source"]) if "source" in ds.column_names else [f"row {i}" for i in rows]


def non_finite(step: int, loss: float, grad_norm: float, rows: list[str], checkpoint: Path | None) -> NonFinite:
    """The error for a step whose loss or gradient norm is not finite: the step, the rows of the micro-batch
    whose loss went first (file:line; all the step's where only the gradient did), the last good checkpoint."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
    shown = ", ".join(rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    last = (f"the last good checkpoint is {checkpoint} (resume from it with --resume, a lower --lr or those rows "
            "fixed)") if checkpoint else "no checkpoint was saved yet"
    return NonFinite(f"step {step}: the {what} is not finite, on the rows {shown or '(none)'}; the step was not "
                     f"applied and nothing was saved from it; {last}")
