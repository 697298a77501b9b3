"""Training memory a user can predict and bound: the micro-batch token budget, when activations are
recomputed, the heap while they are, and the estimate said before training.

`budget(cfg, device)` is --micro-batch-tokens resolved; `checkpointing(cfg, budget)` when layers recompute,
`micro_batch(...)` applies it around one (with `bounded_heap`: glibc holding no freed heap), `trim` returns the
heap a micro-batch freed where memory is tight; `estimate_line` says what a run will need against what the
machine has, and whether it is tight. Measurements: bench/README.md (train_memory.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import math

CPU_BUDGET = 512
"""Tokens a micro-batch holds on a CPU by default. On 2 cores a 4k-token step of 512-token micro-batches
held 2.1 GB over the model (1.5 GB with `trim`) and was faster than one micro-batch of 4k (8.0 GB): smaller
tensors stay in cache."""

HEAP_MMAP_BYTES = 2 << 20
"""While a long micro-batch is checkpointed, allocations from this size up get pages of their own (returned
when freed): glibc's default (a threshold that rises to 32 MB) kept 3.3 GB of freed heap at a 4k-token row, over
0.5 GB of live tensors (1.9 GB at 2k, 0.7 GB at 1k); it costs ~1.3x the time of that micro-batch."""
HEAP_TOKENS = 1024
"""Recomputed micro-batches over this many tokens run in `bounded_heap` (on a CPU)."""

TIGHT_SHARE = 0.5
"""Where a run's estimate over the model passes this share of the memory available, each micro-batch returns
glibc's free heap after its forward and its backward (`trim`): a 4k-token step of 512-token micro-batches then
held 1.47 GB over the model instead of 2.1-2.2 GB, but the page faults of fresh heap cost about a fifth more
time (the demo 327 s against 276 s; train_peers' packed loop 58 s against 46-49 s), so a machine with room
keeps its heap (bench/README.md)."""

EVAL_FACTOR = 4
"""An evaluation batch holds up to this many times the training's micro-batch budget: nothing is kept for a
backward, so only one layer's tensors and the logits at scored positions are live. On 2 cores, scoring the
demo's 80 validation rows took 20.4 s in batches of 256 tokens, 13.6 s in batches of 1,024."""

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
_DEFAULT_MAX_THRESHOLD = 32 << 20  # where glibc's dynamic threshold stops rising on 64-bit


def budget(cfg, device) -> int | None:
    """--micro-batch-tokens: None means the device's default (CPU_BUDGET on a CPU, no limit elsewhere); 0 no
    limit (None)."""
    n = cfg.micro_batch_tokens
    if n is None:
        return CPU_BUDGET if getattr(device, "type", device) == "cpu" else None
    return n or None


def eval_budget(budget_tokens: int | None) -> int | None:
    """The token budget of an evaluation batch: EVAL_FACTOR x the training's (None: no limit)."""
    return budget_tokens * EVAL_FACTOR if budget_tokens else None


def checkpointing(cfg, budget_tokens: int | None) -> str:
    """When layers recompute their activations: "always" (--gradient-checkpointing), "never"
    (--no-gradient-checkpointing, or no budget to be over), or "over budget" (the default: a micro-batch
    over the token budget, which only a row longer than it makes)."""
    if cfg.gradient_checkpointing is None:
        return "over budget" if budget_tokens else "never"
    return "always" if cfg.gradient_checkpointing else "never"


def largest_micro_batch(lengths, batch_size: int, packed: bool, budget_tokens: int | None) -> int:
    """Tokens (padding included) of the largest micro-batch rows of these `lengths` can make."""
    import numpy as np

    top = np.sort(np.asarray(lengths, dtype=np.int64))[::-1][:batch_size]
    if not len(top):
        return 0
    whole = int(top.sum()) if packed else int(top[0]) * len(top)
    return whole if not budget_tokens else min(whole, max(budget_tokens, int(top[0])))


@contextlib.contextmanager
def micro_batch(model, mode: str, tokens: int, budget_tokens: int | None, device, heap_trim: bool = False):
    """Around one micro-batch of `tokens` tokens (padding included): with `mode` "over budget" and more tokens
    than the budget, `model`'s checkpointed layers recompute inside the block; a recomputed micro-batch over
    HEAP_TOKENS on a CPU runs in `bounded_heap`; after it, with `heap_trim`, `trim` (the caller trims between
    forward and backward too)."""
    over = mode == "over budget" and tokens > budget_tokens
    heap = (over or mode == "always") and tokens > HEAP_TOKENS and getattr(device, "type", device) == "cpu"
    if over:
        set_recompute(model, True, over_share(tokens, budget_tokens))
    try:
        with bounded_heap() if heap else contextlib.nullcontext():
            yield
    finally:
        if over:
            set_recompute(model, False)
        if heap_trim:
            trim(device)


def over_share(tokens: int, budget_tokens: int) -> float:
    """The share of layers a micro-batch of `tokens` over the budget recomputes: the others keep their
    activations, about what a micro-batch of the budget keeps in all layers (a 1,024-token row at 512: half)."""
    return 1.0 - budget_tokens / tokens


def set_recompute(model, on: bool, share: float = 1.0) -> None:
    """Switch the checkpointed layers of `model` (set up by transformers' gradient_checkpointing_enable) on or off;
    on: the first `share` of them (rounded up), the rest keep their activations."""
    marked = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    ids = {id(m) for m in marked}  # transformers marks the decoder stack too: its layers are those holding no other
    layers = [m for m in marked if not any(id(c) in ids for c in m.modules() if c is not m)]
    kept = {id(m) for m in layers[math.ceil(len(layers) * share - 1e-9):]}  # the layers that keep activations
    for m in marked:
        m.gradient_checkpointing = on and id(m) not in kept


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


@contextlib.contextmanager
def bounded_heap():
    """Large allocations mapped (and unmapped when freed) inside the block, then glibc's largest threshold
    again: the live tensors of a checkpointed micro-batch are small, the heap they churn through is not."""
    _mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MAX_THRESHOLD)


def release() -> None:
    """What a finished run held, back to the system before the next: cycles collected, glibc's free heap returned
    (compare's second arm started 1.7 GB above its first without it)."""
    import gc

    gc.collect()
    trim()


def trim(device=None) -> None:
    """On a CPU (or `device` None), the heap glibc holds free back to the system (malloc_trim: free pages inside
    the heap too); glibc otherwise keeps what one micro-batch freed for the next, and more (TIGHT_SHARE: when)."""
    if getattr(device, "type", device) in (None, "cpu"):
        _malloc_trim()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def rss_gb(field: str = "VmRSS") -> float | None:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), in GB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def available_gb() -> float | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup (container) limit (Linux)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(x.split()[1]) / 2**20 for x in f if x.startswith("MemAvailable:"))
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                free = min(free, (int(limit) - int(f.read())) / 2**30)
    except (OSError, StopIteration, ValueError):
        pass
    return free


def activation_gb(model_config, tokens: int, recompute: bool, bytes_per: int, share: float = 1.0) -> float:
    """Activations a decoder-only transformer keeps for the backward of `tokens` tokens: per layer about
    8 x hidden + 4 x intermediate values a token (SmolLM2-135M measured 1.2 MB a token over 30 layers in fp32),
    or with recomputation (of `share` of the layers, `set_recompute`) each recomputed layer's input plus one
    layer's worth."""
    h = getattr(model_config, "hidden_size", 0) or 0
    inter = getattr(model_config, "intermediate_size", None) or 4 * h
    layers = getattr(model_config, "num_hidden_layers", 1) or 1
    per_layer = (8 * h + 4 * inter) * bytes_per * tokens
    k = math.ceil(layers * share - 1e-9) if recompute else 0
    kept = k * h * bytes_per * tokens + (layers - k) * per_layer + (per_layer if k else 0)
    return kept / 2**30


def logits_gb(vocab: int, positions: float) -> float:
    """The loss's tensors at `positions` scored positions: logits, their log-softmax and its gradient, in fp32
    (large, so glibc maps them and returns them when freed: no heap allowance)."""
    return 3 * 4 * vocab * positions / 2**30


def trained_share(ds, train_on: str, sparse: bool, sample: int = 1000) -> float:
    """The share of a micro-batch's positions the loss scores: every one without the sparse head or with
    train_on all; else the trained share of the first `sample` prepared rows (their labels as prepared)."""
    if not sparse or train_on == "all" or len(ds) == 0:
        return 1.0
    import numpy as np
    import pyarrow.compute as pc

    labels = pc.list_flatten(ds.data.column("labels").slice(0, sample)).to_numpy()
    return float(np.mean(labels != -100)) if len(labels) else 1.0


def estimate_for(ds, model, cfg, budget_tokens: int | None, mode: str, train_on: str = "assistant",
                 sparse: bool = True) -> tuple[str, bool, bool]:
    """`estimate_line` for training `model` on the prepared rows `ds` with `cfg`'s batches."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.data.column("input_ids")).to_numpy()  # the table's rows (a selection's superset)
    largest = largest_micro_batch(lengths, cfg.batch_size, cfg.packing, budget_tokens)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return estimate_line(model, largest, mode, budget_tokens, trainable, trained_share(ds, train_on, sparse))


def estimate_line(model, tokens: int, mode: str, budget_tokens: int | None, trainable: int,
                  share: float = 1.0) -> tuple[str, bool, bool]:
    """(one line saying the run's expected peak memory against what the machine has, whether it fits, whether
    it is tight: past TIGHT_SHARE of what is available, so micro-batches `trim` the heap; said in the line).
    `tokens`: the largest micro-batch the run can make; `share`: the part of its positions the loss scores.
    The heap allowance (2x activations) is what glibc held in the measurements; an estimate, said as one."""
    now = rss_gb() or 0.0
    p = next(model.parameters())
    over = mode == "over budget" and budget_tokens is not None and tokens > budget_tokens
    recompute = mode == "always" or over
    config = getattr(model, "config", None)
    layers = over_share(tokens, budget_tokens) if over else 1.0
    act = 2 * activation_gb(config, tokens, recompute, p.element_size(), layers)
    act += logits_gb(getattr(config, "vocab_size", 0) or 0, tokens * share)
    optim = trainable * (4 + 8) / 2**30  # fp32 gradient + AdamW's two moments
    need = now + optim + act
    free = available_gb()
    line = (f"memory: about {need:.1f} GB at the peak (model {now:.1f} GB, optimizer {optim:.2f} GB, activations "
            f"and logits ~{act:.1f} GB for micro-batches of up to {tokens:,} tokens"
            + (", recomputed" if recompute else "") + ")" + (f"; {free:.1f} GB available" if free else ""))
    fits = free is None or need - now <= free
    tight = free is not None and need - now > TIGHT_SHARE * free
    if tight:
        line += "; tight: each micro-batch returns the heap it freed (less memory, about 1.2x the time)"
    if not fits:
        line += ("\nwarning: this run may not fit in memory: lower --micro-batch-tokens, --batch-size or "
                 "--max-length, or pass --gradient-checkpointing")
    return line, fits, tight
