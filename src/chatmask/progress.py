"""Progress a person can follow on a terminal and in a log: a tqdm bar where stderr is a terminal, else a
plain line at intervals (under nohup, a pipe or CI, tqdm draws nothing, and a run would say nothing for
many minutes). `progress(total, desc, unit)` returns either; both take `update(n, **postfix)` and `close()`.
`quiet_libraries()` keeps other libraries' chatter from burying chatmask's own lines; `log_step` writes
a run's OUT/log.jsonl (and TensorBoard).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

from .errors import ChatmaskWarning


def _interval() -> float:
    """Seconds between plain progress lines ($CHATMASK_PROGRESS_EVERY, default 30)."""
    try:
        return max(0.0, float(os.environ.get("CHATMASK_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Lines:
    """Plain progress lines on stdout: 'train (assistant): 12/100 steps (12%), 1m20s, ~9m10s left, loss=1.23'."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, every: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit.strip(), initial
        self.every = _interval() if every is None else every
        self.start = self.last = time.monotonic()
        self.initial, self.postfix, self.printed_at = initial, {}, None

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.monotonic()
        if now - self.last >= self.every or (self.total is not None and self.n >= self.total):
            self._print(now)

    def _print(self, now: float) -> None:
        self.last, self.printed_at = now, self.n
        elapsed = now - self.start
        done = self.n - self.initial
        head = f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        parts = [head + (f" ({self.n / self.total:.0%})" if self.total else ""), _duration(elapsed)]
        if self.total and 0 < done and self.n < self.total:
            parts.append(f"~{_duration(elapsed / done * (self.total - self.n))} left")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(", ".join(parts), flush=True)

    def close(self) -> None:
        if self.printed_at != self.n and self.n > self.initial:  # the last state, once
            self._print(time.monotonic())


class _Bar:
    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1, **postfix) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()


def progress(total: int | None, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on a terminal, plain lines at intervals elsewhere."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return _Bar(tqdm(total=total, initial=initial, desc=desc, unit=unit))
    return Lines(total, desc, unit, initial)


def quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notices of transformers/peft internals) would
    bury chatmask's own output."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # chatmask's own: one plain line
        if issubclass(category, ChatmaskWarning):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            plain(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*is deprecated.*")
    import logging

    # bitsandbytes (imported by peft when installed) warns at import that an optional CPU kernel package
    # is missing; its fallback is correct
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def tensorboard_writer(out, cfg, acc):
    """TensorBoard's writer for OUT/tb on the main process with --tensorboard (None without it or tensorboard)."""
    if not (cfg.tensorboard and acc.is_main_process):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


def log_step(out, rec: dict, writer) -> None:
    """One record appended to OUT/log.jsonl, its curves to TensorBoard."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        for k in ("train_loss", "val_loss", "lr", "tokens_per_s"):
            if k in rec:
                writer.add_scalar(k, rec[k], rec["step"])
