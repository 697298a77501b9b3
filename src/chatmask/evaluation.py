"""Evaluation on the held-out rows: the assistant-only validation loss, row by row, and the stop rate.

`hold_out` holds the validation rows out (the same for every arm); `evaluate_rows` scores each row's
assistant tokens (labels are shifted once, in `shift_targets`, which the training loss uses too);
`stop_rate(model, tokenizer, val, r)` answers the first validation prompts greedily and counts the answers
that end with a trained stop, that run into the next message's header, and that run on to the budget.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from . import batches
from .errors import ChatmaskError, ConfigError
from .generation import generate_ids, headers_of, inference, run_renderer, stopping
from .labels import IGNORE


def shift_targets(batch: dict):
    """(target (B, T): the token each position must predict, keep (B, T): the positions trained, the
    model's other inputs: masks, positions, boundaries). The one place labels are shifted."""
    labels = batch["labels"]  # (B, T)
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    return target, target != IGNORE, {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}


# ---------------------------------------------------------------- the held-out rows


@dataclass
class Holdout:
    """The training rows and the validation rows held out from them (the same for every arm)."""

    train: object  # datasets.Dataset with input_ids / labels (assistant labels)
    val: object
    val_tokens: int  # assistant tokens scored by validation
    val_sha256: str  # their hash: every arm must score the same ones


def hold_out(ds, cfg, val_ds=None) -> Holdout:
    """Hold out validation rows (--val-split, --val-rows): a seeded choice independent of the training
    seed (--split-seed), or `val_ds` (--val-data)."""
    if val_ds is None:
        g = torch.Generator().manual_seed(cfg.split_seed)
        perm = torch.randperm(len(ds), generator=g).tolist()  # row indices in a seeded order
        k = max(1, round(cfg.val_split * len(ds)))
        if cfg.val_rows:
            k = min(k, cfg.val_rows)
        if k >= len(ds):
            raise ConfigError(f"{len(ds)} rows are too few to hold out {k} for validation and train on the rest: "
                              "use more rows, or pass --val-data FILE with validation rows of their own")
        val_ds, ds = ds.select(sorted(perm[:k])), ds.select(sorted(perm[k:]))
    elif cfg.val_rows and len(val_ds) > cfg.val_rows:
        val_ds = val_ds.select(range(cfg.val_rows))
    h = hashlib.sha256()
    n = 0
    for ids, labs in zip(val_ds["input_ids"], val_ds["labels"]):
        kept = [(i, t) for i, t in enumerate(labs) if t != IGNORE and i > 0]
        n += len(kept)
        h.update(json.dumps([list(ids), kept]).encode())
    if n == 0:
        raise ConfigError("the validation rows have no assistant token to score")
    return Holdout(ds, val_ds, n, h.hexdigest())


# ---------------------------------------------------------------- the validation loss


def evaluate(model, val, pad_id: int, batch_size: int, acc=None, sparse=True) -> float:
    """Mean cross-entropy over the assistant tokens of `val` (labels as prepared: assistant only)."""
    rows = evaluate_rows(model, val, pad_id, batch_size, acc, sparse)
    return float(rows[:, 0].sum() / rows[:, 1].sum())


def evaluate_rows(model, val, pad_id: int, batch_size: int, acc=None, sparse=True, max_tokens=None) -> torch.Tensor:
    """(R, 2) float64: each validation row's cross-entropy sum over its assistant tokens and their
    number, in `val`'s order (for a bootstrap over rows); the model's mode is restored. `max_tokens`: a
    batch holds at most that many tokens, padding included (training passes `memory.eval_budget`: the logits
    of a batch of eight 1k-token rows alone take 1.6 GB a copy)."""
    with inference(model):
        return _evaluate_loss(model, val, pad_id, batch_size, acc, sparse, max_tokens)


def row_loss_sums(model, batch: dict, sparse: bool = True) -> torch.Tensor:
    """(B, 2) float64: per row of `batch`, the cross-entropy sum over its trained targets and their number."""
    ids = batch["input_ids"]  # (B, T)
    target, keep, kwargs = shift_targets(batch)
    out = torch.zeros(ids.shape[0], 2, dtype=torch.float64)
    if not keep.any():
        return out
    if sparse:
        logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False, **kwargs).logits  # (N, V)
    else:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits[keep]  # (N, V)
    loss = torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="none")  # (N,)
    row = keep.nonzero()[:, 0].cpu()  # (N,): the row of each kept target, row-major as logits_to_keep
    out[:, 0].index_add_(0, row, loss.detach().double().cpu())
    out[:, 1] = keep.sum(dim=1).double().cpu()
    return out


def _batches(lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Row indices by ascending length (little padding), --eval-batch-size rows at a time, each cut by the
    token budget (`batches.by_tokens`)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = []
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        out += [[rows[i] for i in run] for run in batches.by_tokens([lengths[r] for r in rows], max_tokens, True)]
    return out


def _evaluate_loss(model, val, pad_id: int, batch_size: int, acc, sparse, max_tokens=None) -> torch.Tensor:
    rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
    table = torch.zeros(len(val), 2, dtype=torch.float64)  # (R, 2): this process's rows filled in
    device = acc.device if acc else next(model.parameters()).device
    base = getattr(model, "module", model)  # DDP wraps the model
    dtype = base.get_input_embeddings().weight.dtype if hasattr(base, "get_input_embeddings") else torch.float32
    chunks = _batches(batches.row_lengths(val), batch_size, max_tokens)
    # every process runs the same number of forward passes (a wrapped model may talk to the others in
    # each one, e.g. DDP's buffer broadcast); a process out of chunks repeats one and does not count it
    for k in range(-(-len(chunks) // world)):
        idx = k * world + rank
        chunk = chunks[idx if idx < len(chunks) else 0]
        rows = val.select(chunk)
        b = batches.collate(batches.examples_of(rows), pad_id, "assistant", dtype)
        sums = row_loss_sums(model, batches.to_device(b, device), sparse)
        if idx < len(chunks):
            table[chunk] = sums
    if acc and world > 1:  # every row was filled by exactly one process
        table = acc.reduce(table.to(device), "sum").cpu()
    return table


# ---------------------------------------------------------------- the stop rate


def first_answer(input_ids, labels) -> tuple[list[int], list[int]] | None:
    """(prompt: the ids before the first trained token, reference: the first run of trained tokens, the
    answer with its stop), or None for a row with no trained token after its first."""
    start = next((k for k, t in enumerate(labels) if t != IGNORE), None)
    if not start:
        return None
    end = start
    while end < len(labels) and labels[end] != IGNORE:
        end += 1
    return list(input_ids[:start]), list(input_ids[start:end])


def stop_prompts(val, tokenizer, stops, n: int, max_new_tokens: int) -> tuple[list[tuple[list, list]], dict]:
    """The first `n` validation rows (in the held-out order) whose first answer ends with a stop within
    `max_new_tokens` tokens, as (prompt, reference); and how many rows were passed over, by reason."""
    picked, skipped = [], {"longer": 0, "no stop": 0, "shortest": None}
    for ids, labels in zip(val["input_ids"], val["labels"]):
        if len(picked) >= n:
            break
        got = first_answer(ids, labels)
        if got is None:
            continue
        if not tokenizer.decode(got[1]).rstrip().endswith(tuple(stops)):
            skipped["no stop"] += 1  # cut off by truncation: its stop was never trained
        elif len(got[1]) > max_new_tokens:
            skipped["longer"] += 1
            skipped["shortest"] = min(skipped["shortest"] or len(got[1]), len(got[1]))
        else:
            picked.append(got)
    return picked, skipped


def outcome(text: str, stopped: bool, stops, headers) -> tuple[str, str | None]:
    """('stopped' | 'header' | 'ran on', the header run into) of one generated text (special tokens kept):
    a header written before the first stop is a run into the next message, even if a stop follows."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    before = text[:at]
    hit = min(((before.find(h), h) for h in headers if h in before), default=None)
    if hit is not None:
        return "header", hit[1]
    return ("stopped" if stopped else "ran on"), None


def stop_rate(model, tokenizer, val, r, *, prompts: int = 8, max_new_tokens: int = 128, batch_size: int = 8,
              progress: bool = False) -> dict:
    """How often greedy answers to the first `prompts` validation prompts end with a trained stop within
    `max_new_tokens` (see the module's docstring); a plain dict for result.json. No eligible row: a dict
    with `error` saying why, never an exception."""
    t0 = time.perf_counter()
    st = stopping(tokenizer, r)
    heads = headers_of(r)
    picked, skipped = stop_prompts(val, tokenizer, st.stops, prompts, max_new_tokens)
    base = {"requested": prompts, "max_new_tokens": max_new_tokens, "stops": list(st.stops)}
    if not picked:
        return {"prompts": 0, **base, "error": _no_prompts(len(val), skipped, max_new_tokens)}
    bar = None
    if progress:
        from .progress import progress as progress_bar

        bar = progress_bar(len(picked), "stop rate", "answers")
    try:
        got = generate_ids(model, tokenizer, st, [p for p, _ in picked], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    n = len(picked)
    counts, stops_hit, headers_hit, examples = {"stopped": 0, "header": 0, "ran on": 0}, {}, {}, []
    for (_, ref), (new, stopped) in zip(picked, got):
        text = tokenizer.decode(new)
        kind, header = outcome(text, stopped, st.stops, heads)
        counts[kind] += 1
        if kind == "stopped":
            end = next((s for s in sorted(st.stops, key=len, reverse=True) if text.rstrip().endswith(s)), "a stop")
            stops_hit[end] = stops_hit.get(end, 0) + 1
        if header:
            headers_hit[header] = headers_hit.get(header, 0) + 1
        if len(examples) < 3:
            examples.append({"generated": text, "reference": tokenizer.decode(ref), "outcome": kind})
    return {"prompts": n, **base, "stopped": counts["stopped"], "header": counts["header"], "ran_on": counts["ran on"],
            "stop_rate": counts["stopped"] / n, "header_rate": counts["header"] / n,
            "ran_on_rate": counts["ran on"] / n,
            "mean_new_tokens": sum(len(g) for g, _ in got) / n,
            "mean_reference_tokens": sum(len(ref) for _, ref in picked) / n,
            "stops_hit": stops_hit, "headers_hit": headers_hit,
            "prompts_sha256": hashlib.sha256(json.dumps([p for p, _ in picked]).encode()).hexdigest(),
            "seconds": time.perf_counter() - t0, "examples": examples}


LOGGED = ("prompts", "stop_rate", "header_rate", "ran_on_rate", "mean_new_tokens", "mean_reference_tokens",
          "max_new_tokens", "error")
"""The keys of a stop rate that a run's log.jsonl records (result.json keeps it whole)."""


def run_stop_rate(model, tokenizer, val, data_cfg, train_cfg, progress: bool = False) -> dict:
    """`stop_rate` as a run measures it: rendered as its rows were labelled (generation.run_renderer), with
    its --stop-prompts, --stop-max-new-tokens and --eval-batch-size; no stop to measure (a template without
    an end of turn, no eos) is a reason in the dict, not an exception."""
    try:
        return stop_rate(model, tokenizer, val, run_renderer(tokenizer, data_cfg), prompts=train_cfg.stop_prompts,
                         max_new_tokens=train_cfg.stop_max_new_tokens, batch_size=train_cfg.eval_batch_size,
                         progress=progress)
    except ChatmaskError as e:
        return {"prompts": 0, "error": str(e)}


def _no_prompts(rows: int, skipped: dict, max_new_tokens: int) -> str:
    why = f"none of the {rows} validation rows has a first answer that ends with its stop within " \
          f"--stop-max-new-tokens {max_new_tokens} tokens"
    if skipped["longer"]:
        why += (f" ({skipped['longer']} are longer, the shortest {skipped['shortest']} tokens: raise "
                "--stop-max-new-tokens)")
    if skipped["no stop"]:
        why += f" ({skipped['no stop']} first answers were cut before their stop by --max-length)"
    return why


def describe(res: dict) -> str:
    """One line for the log: 'stop rate: 7/8 answers ended with '<|im_end|>' within 128 tokens; 1 ran into
    '<|im_start|>user''."""
    if "error" in res:
        return f"stop rate: not measured: {res['error']}"
    hit = res.get("stops_hit") or {}
    ended = " or ".join(repr(s) for s in (hit or res.get("stops") or [])) or "a stop"
    line = (f"stop rate: {res['stopped']}/{res['prompts']} answers ended with {ended} within {res['max_new_tokens']} "
            f"tokens")
    if res["header"]:
        line += f"; {res['header']} ran into " + " or ".join(repr(h) for h in res["headers_hit"])
    if res["ran_on"]:
        line += f"; {res['ran_on']} ran on to the limit"
    if res["prompts"] < res["requested"]:
        line += f" (only {res['prompts']} of the {res['requested']} prompts asked for have a short enough answer)"
    return line
