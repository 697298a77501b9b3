"""A dataset's conversations labelled in batches, in order, in worker processes where --num-proc asks:
`labelled(data, cfg, tok, report)` yields per batch one `Dropped` or the `Labelled` rows of each conversation
(one; under --turns per-turn one a trained turn; under tree one tree row, tree.py), what prepare writes.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

from . import audit, conversations, labels, tree
from .config import DataConfig
from .errors import ChatmaskError

BATCH = 512  # conversations labelled per tokenizer call

_worker_tok = None


def _init_worker(tok):
    global _worker_tok
    _worker_tok = tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


class Labelled(NamedTuple):
    """A row that became an example, as a worker sends it back (plain data: cheap to pickle)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: int
    respelt: int
    unstopped: int
    appended: bool
    by_role: tuple[int, ...] | None  # its rendering's tokens by role (audit.role_counts)
    control_text: list[int]  # Example.control_text flattened
    tree_ends: list[int]  # tree.py's ends of a tree row, else []
    turns: tuple | None  # tree.turn_rows' counts, on a conversation's first row under --turns per-turn / tree


class Dropped(NamedTuple):
    """A row that did not: the reason it is counted under, and the message that names it."""

    reason: str
    message: str


def _label_batch(batch, cfg: DataConfig, tok=None, by_role: bool = True) -> list[Labelled | Dropped]:
    """[(messages, source)] -> per row one Dropped, or its Labelled rows (one; under --turns per-turn one a trained
    turn, under tree one or, where the tree falls back, one a turn), in order; conversations counted by role if
    `by_role`."""
    from .hub import stop_tokens

    tok = tok or _worker_tok
    stops = stop_tokens(cfg, tok)
    if cfg.turns == "full":
        encoded = [r if isinstance(r, ChatmaskError) else [(r, [], None)] for r in labels.encode_many(
            batch, tok, train_on=cfg.train_on, max_length=cfg.max_length, template=cfg.template,
            truncation=cfg.truncation, end_of_turn=cfg.end_of_turn, stream=cfg.stream, stop_tokens=stops,
            control_tokens=cfg.control_tokens)]
    else:
        encoded = [tree.turn_rows(m, s, tok, cfg, stops, by_role) for m, s in batch]
    kept = [row for row, r in zip(batch, encoded) if not isinstance(r, ChatmaskError)]
    roles = iter(audit.role_counts(kept, tok, cfg.template, stops, cfg.end_of_turn, cfg.control_tokens) if by_role
                 else [None] * len(kept))
    out = []
    for r in encoded:
        if isinstance(r, ChatmaskError):
            out.append(Dropped(r.reason, str(r)))
            continue
        role = next(roles)
        out += [Labelled(e.input_ids, e.labels, e.source, e.truncated, e.respelt, e.unstopped, e.stop_appended,
                         role if k == 0 else None, [i for span in e.control_text for i in span], ends, turns)
                for k, (e, ends, turns) in enumerate(r)]
    return out


def _batches(data: str, cfg: DataConfig, report):
    batch = []
    n = 0
    for conv in conversations.load(data, format=cfg.format, salvage=cfg.salvage, skip_invalid=cfg.skip_invalid,
                                   split=cfg.split, report=report):
        if cfg.limit is not None and n >= cfg.limit:
            break
        batch.append((conv.messages, conv.source))
        n += 1
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def labelled(data, cfg, tok, report):
    """Labelled batches in input order; with num_proc > 1 at most 2*num_proc batches are in flight."""
    if cfg.num_proc <= 1:
        for i, b in enumerate(_batches(data, cfg, report)):
            yield _label_batch(b, cfg, tok, i * BATCH < audit.ROLE_ROWS)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(cfg.num_proc, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(tok,)) as pool:
        window = collections.deque()
        for i, b in enumerate(_batches(data, cfg, report)):
            window.append(pool.submit(_label_batch, b, cfg, None, i * BATCH < audit.ROLE_ROWS))
            if len(window) >= 2 * cfg.num_proc:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
