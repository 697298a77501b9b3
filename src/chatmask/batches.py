"""Rows to batches: which rows each optimizer step takes (`global_batch`, a pure function of seed and step,
so a resumed run continues exactly; `micro_batches` cuts them per process), and the tensors they become
(`collate` pads a batch of examples, `pack` concatenates them into packs).

Labels stay unshifted (the loss shifts once). `labels.apply_train_on` (the one definition of `train_on`)
turns assistant labels into the labels of another arm, so every arm trains on the same prepared rows. A
*pack* is one sequence of the batch holding several examples end to end: position ids restart per example,
and either the examples' boundaries (`attention="varlen"`: `cu_seq_lens_*`, which flash-attention's varlen
kernel and `attention.VARLEN` read) or a block-diagonal 4D mask (`attention="mask"`) keep them apart, so no
token attends to, or is labelled from, another example. An example with `tree_ends` (a --turns tree row, tree.py)
also keeps its branches apart: its positions are depths, and it attends through its tree mask (`tree_chains`,
its chains per segment, for `attention.VARLEN`; inside the 4D mask otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import tree
from .labels import IGNORE, apply_train_on

if TYPE_CHECKING:
    from .config import TrainConfig


def collate(examples: list[dict], pad_id: int, train_on: str = "assistant", dtype=torch.float32) -> dict:
    """Right-padded batch, one example per sequence: input_ids, attention_mask, labels (-100 on padding). With a
    tree row among them, also position_ids and a 4D additive mask (`dtype`) holding each row's tree."""
    T = max(len(x["input_ids"]) for x in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    lab = torch.full((len(examples), T), IGNORE, dtype=torch.long)  # (B, T)
    for b, x in enumerate(examples):
        n = len(x["input_ids"])
        ids[b, :n] = torch.tensor(x["input_ids"])
        att[b, :n] = 1
        lab[b, :n] = torch.tensor(_labels(x, train_on))
    if not any(x.get("tree_ends") for x in examples):
        return {"input_ids": ids, "attention_mask": att, "labels": lab}
    pos = torch.zeros((len(examples), T), dtype=torch.long)  # (B, T)
    allowed = torch.eye(T, dtype=torch.bool).repeat(len(examples), 1, 1)  # (B, T, T): padding sees itself
    for b, x in enumerate(examples):
        n = len(x["input_ids"])
        pos[b, :n] = _positions(x)
        allowed[b, :n, :n] = _attends(x)
    return {"input_ids": ids, "attention_mask": _additive(allowed, dtype), "position_ids": pos, "labels": lab}


def _labels(x: dict, train_on: str) -> list[int]:
    """An example's labels for `train_on`; in a tree row never a token opening a branch after a finished one."""
    out = apply_train_on(x["input_ids"], x["labels"], train_on)
    for i in tree.after_leaf(x.get("tree_ends") or ()):
        out[i] = IGNORE
    return out


def _positions(x: dict) -> torch.Tensor:
    ends = x.get("tree_ends")
    return torch.tensor(tree.positions(ends)) if ends else torch.arange(len(x["input_ids"]))


def _attends(x: dict) -> torch.Tensor:
    """(n, n) bool: which tokens each token of the example attends to (causal, or its tree's)."""
    ends = x.get("tree_ends")
    return tree.attends(ends) if ends else torch.ones(len(x["input_ids"]), len(x["input_ids"]), dtype=torch.bool).tril()


def _chains(ends) -> list[list]:
    """A tree row's chains (tree.chains) as attention.VARLEN takes them: [length, ancestor indices, the chain's
    (length, ancestors + length) bool mask: every ancestor, then causal]."""
    out = []
    for n, prefix in tree.chains(ends):
        mask = torch.ones(n, len(prefix) + n, dtype=torch.bool)
        mask[:, len(prefix):] = torch.ones(n, n, dtype=torch.bool).tril()
        out.append([n, torch.tensor(prefix, dtype=torch.long), mask])
    return out


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    mask = torch.zeros((allowed.shape[0], 1, *allowed.shape[1:]), dtype=dtype)  # (B, 1, T, T)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def examples_of(rows) -> list[dict]:
    """A prepared dataset's selected rows as example dicts (input_ids, labels, and tree_ends where it has them)."""
    cols = [c for c in ("input_ids", "labels", "tree_ends") if c in rows.column_names]
    return [dict(zip(cols, v)) for v in zip(*(rows[c] for c in cols))]


def row_lengths(ds) -> list[int]:
    """Tokens of each row of a prepared dataset (a selection's rows), from Arrow without reading the tokens."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_pylist()


def to_device(batch: dict, device) -> dict:
    """The batch's tensors (and lists of them: tree_chains) moved to `device`; other values (a packed batch's
    max_length_q/k) as they are."""
    def move(v):
        if isinstance(v, list):
            return [move(x) for x in v]
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return {k: move(v) for k, v in batch.items()}


def pack(examples: list[dict], pad_id: int, train_on: str = "assistant", max_tokens: int | None = None,
         dtype=torch.float32, attention: str = "mask") -> dict:
    """Examples concatenated into packs, position ids restarting per example. `attention="varlen"`: one pack
    of every example without padding, and the examples' boundaries as `cu_seq_lens_q/k` + `max_length_q/k`,
    for attention run per example (cost sum(n_i^2)); `"mask"`: one pack per `max_tokens` budget (first-fit
    in order, packs padded to the longest) with a 4D block-diagonal causal mask (additive, `dtype`), which
    sdpa and eager attention honour on every device (position ids alone do not isolate examples on CPU),
    at T^2 cost per pack. Boundaries are over the flattened (B*T) tokens; a padding tail is a segment of
    its own."""
    if attention not in ("mask", "varlen"):
        raise ValueError(f"unknown attention {attention!r}")
    total = sum(len(x["input_ids"]) for x in examples)
    # per-example attention needs no pack budget: one pack, no padding at all (the budget bounds a mask's T^2)
    packs = _first_fit(examples, total if attention == "varlen" else max_tokens or total)
    T = max(sum(len(x["input_ids"]) for x in p) for p in packs)
    B = len(packs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    lab = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    pos = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    seg = torch.full((B, T), -1, dtype=torch.long)  # (B, T) example index within its pack, -1 = padding
    lens: list[int] = []  # segment lengths over the flattened packs, padding tails included
    trees: list = []  # per segment: its tree's chains (attention.VARLEN), or None (causal)
    for b, p in enumerate(packs):
        o = 0
        for k, x in enumerate(p):
            n = len(x["input_ids"])
            ids[b, o:o + n] = torch.tensor(x["input_ids"])
            lab[b, o:o + n] = torch.tensor(_labels(x, train_on))
            # the first token of an example is never a target of the previous example's last position
            pos[b, o:o + n] = _positions(x)
            seg[b, o:o + n] = k
            o += n
            lens.append(n)
            trees.append(_chains(x["tree_ends"]) if x.get("tree_ends") and attention == "varlen" else None)
        if T > o:
            lens.append(T - o)
            trees.append(None)
    out = {"input_ids": ids, "position_ids": pos, "labels": _cut_cross_example_targets(lab, seg)}
    if any(m is not None for m in trees) and attention == "varlen":
        out["tree_chains"] = trees  # attention.VARLEN reads them; over the flattened segments, like the boundaries
    if attention == "varlen":
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)  # (S + 1,)
        # an all-ones 2D mask: no padding mask to build, and transformers does not re-derive one from
        # the position ids; the boundaries alone keep examples apart
        out.update(attention_mask=torch.ones((B, T), dtype=torch.long), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=max(lens), max_length_k=max(lens))
    else:
        out["attention_mask"] = _block_diagonal_mask(seg, dtype, packs)
    return out


def _first_fit(examples: list[dict], budget: int) -> list[list[dict]]:
    """Examples grouped into packs of at most `budget` tokens, each into the first pack with room, in order
    (an example longer than the budget gets a pack of its own)."""
    packs: list[list[dict]] = []
    used: list[int] = []
    for x in examples:
        n = len(x["input_ids"])
        k = next((k for k, u in enumerate(used) if u + n <= budget), None)
        if k is None:
            packs.append([x])
            used.append(n)
        else:
            packs[k].append(x)
            used[k] += n
    return packs


def _block_diagonal_mask(seg: torch.Tensor, dtype, packs=()) -> torch.Tensor:
    """The additive causal mask that keeps each token inside its own example (`seg`: example index per
    position, -1 on padding), and inside its tree's branches for a tree row of `packs`."""
    B, T = seg.shape
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    allowed = same & causal & (seg[:, :, None] >= 0)
    allowed |= torch.eye(T, dtype=torch.bool)  # padding positions attend to themselves: no NaN from an empty softmax
    for b, p in enumerate(packs):
        o = 0
        for x in p:
            n = len(x["input_ids"])
            if x.get("tree_ends"):
                allowed[b, o:o + n, o:o + n] = tree.attends(x["tree_ends"])
            o += n
    return _additive(allowed, dtype)


def _cut_cross_example_targets(lab: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The loss shifts labels left by one; an example's first label would then be predicted from the
    previous example's last position. Those labels are never trained in an unpacked row either (a row's
    first token has no prediction), so drop them."""
    first = torch.zeros_like(seg, dtype=torch.bool)
    first[:, 1:] = seg[:, 1:] != seg[:, :-1]
    lab = lab.clone()
    lab[first] = IGNORE
    return lab


# ---------------------------------------------------------------- which rows, in which step


def global_batch(n_rows: int, cfg: TrainConfig, step: int, world: int, lengths=None) -> list[int]:
    """Row indices of optimizer step `step` (0-based): epochs of seeded permutations, consumed in order.
    With `lengths` (--group-by-length), each run of 64 steps' rows is sorted by length and cut into steps
    whose order is shuffled again: rows of a micro-batch have similar lengths, so little padding."""
    G = cfg.batch_size * cfg.grad_accum * world
    out, start = [], step * G
    while len(out) < G:
        epoch, pos = divmod(start + len(out), n_rows)
        out += _epoch_order(n_rows, cfg.seed, epoch, G, lengths)[pos:pos + G - len(out)]
    return out


def _epoch_order(n_rows, seed, epoch, G, lengths):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    if lengths is None:
        return perm
    out, M = [], 64 * G
    for i in range(0, n_rows, M):
        chunk = sorted(perm[i:i + M], key=lambda r: -lengths[r])
        groups = [chunk[k:k + G] for k in range(0, len(chunk), G)]
        out += [r for j in torch.randperm(len(groups), generator=g).tolist() for r in groups[j]]
    return out


def micro_batches(ds, rows: list[int], cfg: TrainConfig, rank: int, world: int, pad_id: int, train_on: str, dtype,
                  attention: str = "mask", budget: int | None = None):
    """This process's micro-batches of one optimizer step as (batch, real tokens, indices of its rows in `ds`),
    and the step's
    trained-target count over all processes (every process computes it from the same rows). `budget`
    (--micro-batch-tokens): each --batch-size slot is cut, in order, into micro-batches of at most that many
    tokens (padding included); every process then runs the same number (`_even`)."""
    examples = [{**x, "row": k} for x, k in zip(examples_of(ds.select(rows)), rows)]
    bs = cfg.batch_size
    out, total = [], 0
    for m in range(cfg.grad_accum):
        slots = []
        for r in range(world):
            chunk = examples[(m * world + r) * bs:(m * world + r + 1) * bs]
            runs = by_tokens([len(x["input_ids"]) for x in chunk], budget, padded=not cfg.packing)
            slots.append([[chunk[i] for i in run] for run in runs])
        for r, pieces in enumerate(_even(slots, pad_id)):
            for chunk in pieces:
                b = (pack(chunk, pad_id, train_on, cfg.pack_tokens, dtype, attention) if cfg.packing
                     else collate(chunk, pad_id, train_on, dtype))
                if chunk[0].get("filler"):
                    b["labels"].fill_(IGNORE)  # untrained whatever the arm (train_on="all" labels every id)
                total += int((b["labels"][:, 1:] != IGNORE).sum())
                if r == rank:
                    real = [x for x in chunk if not x.get("filler")]
                    out.append((b, sum(len(x["input_ids"]) for x in real), [x["row"] for x in real]))
    return out, total


def by_tokens(lengths: list[int], budget: int | None, padded: bool) -> list[list[int]]:
    """Indices of rows of these `lengths`, cut in order into runs of at most `budget` tokens (a padded run
    costs rows x its longest, a packed one their sum); a row longer than the budget is a run of its own.
    The one rule of --micro-batch-tokens, for training's micro-batches and evaluation's batches."""
    if not budget:
        return [list(range(len(lengths)))] if lengths else []
    runs, run, longest, total = [], [], 0, 0
    for i, n in enumerate(lengths):
        cost = (len(run) + 1) * max(longest, n) if padded else total + n
        if run and cost > budget:
            runs.append(run)
            run, longest, total = [], 0, 0
        run.append(i)
        longest, total = max(longest, n), total + n
    return runs + [run] if run else runs


def _even(slots: list[list[list[dict]]], pad_id: int) -> list[list[list[dict]]]:
    """Every process the same number of micro-batches (DDP broadcasts buffers and FSDP gathers weights at
    each forward, so unequal counts would hang): a short list gets filler micro-batches of one untrained
    token (loss 0, gradient 0)."""
    k = max(len(s) for s in slots)
    filler = {"input_ids": [pad_id], "labels": [IGNORE], "filler": True}
    return [s + [[dict(filler)]] * (k - len(s)) for s in slots]
