"""One conversation's per-turn examples laid out as one tree-shaped row (`--turns tree`).

`labels.encode_turns` gives one example per assistant turn: the history as inference renders it (a
reasoning template strips earlier turns' thinking), then that turn's answer, trained. Their token ids share
prefixes: turn k+1's prompt starts with turn k's, and differs where turn k's answer is trained (with its
reasoning) against the same answer as the history shows it (without). `lay_out` merges the examples' ids
into a prefix tree and writes it depth first as one row: the history once, each trained answer as a branch
right after its fork point. Per token of the row, `ends[i]` is one past the last token of its subtree, so

- token i attends to token j iff `j <= i < ends[j]` (j is i or one of its ancestors: its own example's prefix),
- its position id is its depth (`positions`): its index in its own example,
- a trained token is always the first child of its parent, so it sits right after it and the loss's one
  shift pairs it with the right position: labels stay unshifted and aligned with input_ids, as everywhere.

So every trained token is predicted from exactly the context and positions it has in its per-turn example:
the loss is the per-turn examples' loss, at the cost of one conversation plus its branches. A row it cannot
lay out that way (two examples training the same position, or two different tokens after one prefix) gets
None, and its per-turn examples are trained instead (counted by `prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class TreeRow:
    """A tree-laid row: `input_ids`, `labels` (unshifted), `ends` (see the module), and where each merged
    example's tokens are in it (`paths[e][d]`: the row index of example e's token d)."""

    input_ids: list[int]
    labels: list[int]
    ends: list[int]
    paths: list[list[int]]


def lay_out(examples) -> TreeRow | None:
    """The per-turn examples (objects or dicts with `input_ids` and `labels`) of one conversation as one
    tree row, or None where no tree explains them (see the module)."""
    seqs = [(_get(e, "input_ids"), _get(e, "labels")) for e in examples]
    token, trained, children = [], [], [{}]  # node k+1 is token k's node; node 0 the root
    walks = []
    for ids, labels in seqs:
        node, walk = 0, []
        walks.append(walk)
        for d, t in enumerate(ids):
            child = children[node].get(t)
            if child is None:
                child = len(children)
                children[node][t] = child
                children.append({})
                token.append(t)
                trained.append(False)
            if d and labels[d] != IGNORE:
                if trained[child - 1]:
                    return None  # two examples train the same token after the same context
                trained[child - 1] = True
            node = child
            walk.append(node)
    return _write(token, trained, children, walks)


def _get(e, key):
    return e[key] if isinstance(e, dict) else getattr(e, key)


def _write(token, trained, children, walks) -> TreeRow | None:
    """The prefix tree depth first, each node's trained child first (None where a node has two)."""
    ids, labels, ends, row_of = [], [], [], [0] * len(children)
    stack = [(c, False) for c in reversed(_ordered(children[0], trained))]  # first tokens: never trained
    open_at: list[int] = []  # row index of each node on the current path
    while stack:
        node, done = stack.pop()
        if done:
            ends[open_at.pop()] = len(ids)
            continue
        kids = _ordered(children[node], trained)
        if sum(trained[c - 1] for c in kids) > 1:
            return None
        open_at.append(len(ids))
        row_of[node] = len(ids)
        ids.append(token[node - 1])
        labels.append(token[node - 1] if trained[node - 1] else IGNORE)
        ends.append(-1)
        stack.append((node, True))
        stack += [(c, False) for c in reversed(kids)]
    return TreeRow(ids, labels, ends, [[row_of[n] for n in w] for w in walks])


def _ordered(kids: dict, trained) -> list[int]:
    """Children in the order written: the trained one first, the others as they were first seen."""
    nodes = list(kids.values())
    return sorted(nodes, key=lambda c: not trained[c - 1])


def _walk(ends):
    """(i, the row indices of i's ancestors, root first) for each token of the row, in order."""
    path: list[int] = []
    for i in range(len(ends)):
        while path and ends[path[-1]] <= i:
            path.pop()
        yield i, path
        path.append(i)


def positions(ends) -> list[int]:
    """Each token's depth in the tree: its position id (its index in its own example)."""
    return [len(path) for _, path in _walk(ends)]


def attends(ends):
    """(n, n) bool tensor: [i, j] where token i attends to token j (j is i or an ancestor of i)."""
    import torch

    end = torch.as_tensor(ends, dtype=torch.long)  # (n,)
    idx = torch.arange(len(end))  # (n,)
    return (idx[None, :] <= idx[:, None]) & (idx[:, None] < end[None, :])


def chains(ends) -> list[tuple[int, list[int]]]:
    """The row cut into chains, in order, as (length, the row indices of the chain's ancestors): runs of tokens
    each the child of the one before it, so token k of a chain attends to the ancestors and the chain's first
    k + 1 tokens. A new chain starts where a branch has ended (`after_leaf`). Attention per chain costs what
    the tree needs, not a dense mask's n^2."""
    starts = [0, *after_leaf(ends)]
    first = set(starts)
    prefix = {i: list(path) for i, path in _walk(ends) if i in first}
    return [(end - start, prefix[start]) for start, end in zip(starts, [*starts[1:], len(ends)])] if ends else []


def after_leaf(ends) -> list[int]:
    """Tokens whose parent is not the token before them (they open a branch after a finished one): the
    loss's shift would predict them from the wrong context, so they are never targets."""
    return [i for i in range(1, len(ends)) if ends[i - 1] <= i]


def paths(ends) -> list[list[int]]:
    """Each leaf's path from the root, as row indices: the sequences the tree holds (its examples, or
    fewer where one example's tokens are all on another's path)."""
    return [[*path, i] for i, path in _walk(ends) if ends[i] == i + 1]


# ---------------------------------------------------------------- a conversation's rows (prepare)


def turn_rows(messages, source: str, tokenizer, cfg, stops, count_full: bool = True) -> list:
    """A conversation under `cfg.turns` ("per-turn" or "tree") as [(Example, ends, counts)]: its per-turn
    examples (ends []), or one tree row where `lay_out` explains them. `counts` (on the first only): tokens of
    the full rendering (encoded again only where `count_full`: prepare counts the rows audit.role_counts counts;
    None where not counted or not one example), of the per-turn examples, of the rows written, and 1 where a
    tree fell back to per-turn examples. Returns (not raises) the ChatmaskError `encode_turns` raises,
    as `labels.encode_many` does."""
    from . import labels
    from .errors import ChatmaskError

    kw = dict(max_length=cfg.max_length, template=cfg.template, source=source, end_of_turn=cfg.end_of_turn,
              stream=cfg.stream, stop_tokens=stops, control_tokens=cfg.control_tokens)
    try:
        exs = labels.encode_turns(messages, tokenizer, **kw)
    except ChatmaskError as e:
        return e
    full = None
    try:
        if count_full:
            full = len(labels.encode(messages, tokenizer, truncation=cfg.truncation, **kw).input_ids)
    except ChatmaskError:
        pass
    row = lay_out(exs) if cfg.turns == "tree" and len(exs) > 1 else None
    groups = [(None, [e]) for e in exs] if row is None else _within(exs, row, cfg.max_length)
    out = [(e[0], [], None) if r is None else (_as_example(r, e, source), r.ends, None) for r, e in groups]
    for e, ends, _ in out:
        e.labels = labels.apply_train_on(e.input_ids, e.labels, cfg.train_on)
        for i in after_leaf(ends):
            e.labels[i] = IGNORE
    expanded = sum(len(e.input_ids) for e in exs)
    fell_back = int(cfg.turns == "tree" and len(exs) > 1 and row is None)
    out[0] = (*out[0][:2], (full, expanded, sum(len(e.input_ids) for e, _, _ in out), fell_back))
    return out


def _within(exs, row: TreeRow, limit) -> list[tuple[TreeRow | None, list]]:
    """[(tree row or None, its examples)]: the whole tree where it fits `limit` tokens, else consecutive examples
    laid out together while their tree fits (each example, cut to the limit by encode_turns, fits alone)."""
    if not limit or len(row.input_ids) <= limit:
        return [(row, exs)]
    groups, cur, tree = [], [], None
    for e in exs:
        trial = lay_out(cur + [e]) if cur else None
        if trial is not None and len(trial.input_ids) <= limit:
            cur, tree = cur + [e], trial
            continue
        if cur:
            groups.append((tree, cur))
        cur, tree = [e], None
    return groups + [(tree, cur)]


def _as_example(row: TreeRow, exs, source: str):
    """The tree row as one Example: the examples' counts summed, their control-token spans moved to the row."""
    from .assembly import Example

    spans = sorted({(p[a], p[b - 1] + 1) for e, p in zip(exs, row.paths) for a, b in e.control_text})
    return Example(row.input_ids, row.labels, source, truncated=sum(e.truncated for e in exs),
                   respelt=sum(e.respelt for e in exs), stop_appended=any(e.stop_appended for e in exs),
                   unstopped=sum(e.unstopped for e in exs), control_text=spans, tree_ends=row.ends)


def branches(ends) -> list[tuple[int, int, int]]:
    """The branches off the trunk (the last leaf's path: the whole history as the last turn's prompt shows it)
    as (first, end, fork): row indices [first, end) and the trunk token they follow (their parent)."""
    trunk = set(paths(ends)[-1]) if ends else set()
    out, i = [], 0
    while i < len(ends):
        if i in trunk:
            i += 1
            continue
        parent = max(j for j in trunk if j < i and ends[j] > i)
        out.append((i, ends[i], parent))
        i = ends[i]
    return out
