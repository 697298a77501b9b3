"""A rendering's tokens cut at its answer boundaries: `assemble(plan, row, tt) -> (Example, turn ends)`.

`_Plan` is a row rendered, with its answer regions (labels.py makes it); `assemble` builds `input_ids` and
`labels` in one loop per run of tokens, and a row where a token straddles a boundary goes the reference way,
`assemble_respelling`, which re-spells that token as its parts. Tokens that spell a control token written in
a message's content are named in `Example.control_text` (controls.py).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from . import controls
from .errors import TemplateError
from .spans import Turn
from .tokens import Row, TextTokens

IGNORE = -100


@dataclass
class Example:
    """One training row: `labels[i] == input_ids[i]` where trained, `-100` elsewhere (unshifted)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    prefix_preserving: bool = True
    """False when the template rewrites earlier turns, so each turn's prompt in this example is not
    exactly what the model saw at inference for it (use `encode_turns` for the faithful form)."""
    truncated: int = 0
    """tokens cut off by the truncation policy"""
    respelt: int = 0
    """tokens of the whole-text encoding that straddled a prompt/answer boundary and were re-spelt as
    two; 0 means `input_ids` are exactly the tokenizer's encoding of the rendering"""
    stop_appended: bool = False
    """the template writes no end of turn after the last answer, so its stop was appended (see markers)"""
    unstopped: int = 0
    """trained answers whose trained run ends without a stop (the template writes none there, or the
    truncation cut the answer): they do not teach the model to stop"""
    control_text: list[tuple[int, int]] = field(default_factory=list)
    """[first, end) token indices of each control token a message's content writes (--control-tokens: under
    `text` the plain tokens that spell it, under `parse` the control token itself)"""
    tree_ends: list[int] = field(default_factory=list)
    """a --turns tree row (tree.py): one past the last token of each token's subtree; [] for a plain row"""

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class _Plan:
    """A row rendered, with its answer regions, waiting for its tokens."""

    source: str
    text: str  # the rendering
    turns: list[Turn]
    trained: set[int]
    train_on: str
    preserving: bool
    appended: bool = False
    unstopped: frozenset = frozenset()  # trained answers (message indices) whose end of turn holds no stop
    control: list = field(default_factory=list)  # character spans of control tokens the content writes (controls)
    literal: bool = False  # encode those as plain text (--control-tokens text)



def regions(plan: _Plan):
    """The rendering cut at the answer boundaries: region k is [cuts[k], cuts[k+1]) and belongs to answer
    owner[k] (None: prompt text); whether each region is trained."""
    cuts, owner = [0], [None]
    for t in plan.turns:
        for pos, who in ((t.start, t.index), (t.end, None)):
            if pos == cuts[-1]:
                owner[-1] = who
            else:
                cuts.append(pos)
                owner.append(who)
    return cuts, owner, [w in plan.trained for w in owner]


def segments(plan: _Plan) -> list[str]:
    """The rendering cut at its answer boundaries (the 'segments' token stream)."""
    cuts = regions(plan)[0] + [len(plan.text)]
    return [plan.text[a:b] for a, b in zip(cuts, cuts[1:])]


# ---------------------------------------------------------------- tokens to input_ids and labels


def assemble(plan: _Plan, row: Row, tt: TextTokens):
    """input_ids and labels from the whole-text tokens cut at the answer boundaries; also (token index
    just past each answer, whether it is trained, whether its end holds a stop) for truncation. Works per
    run of tokens, not per token: a row costs a few list copies. A row where a token straddles a boundary
    goes the reference way (`assemble_respelling`)."""
    cuts, owner, trained = regions(plan)
    starts, runs = row
    ids = [r.ids for r in runs]
    firsts = list(itertools.accumulate(map(len, ids), initial=0))
    input_ids = list(itertools.chain.from_iterable(ids))
    at = [0]  # token index where each region starts
    for c in cuts[1:]:
        k = bisect.bisect_right(starts, c) - 1
        if k < 0:
            at.append(0)
            continue
        j = runs[k].cut(c - starts[k])  # (index of the first token at or after c, or None: one straddles c)
        if j is None:
            return assemble_respelling(plan, row, tt, cuts, owner, trained)
        at.append(firsts[k] + j)
    at.append(len(input_ids))
    labels, ends = [], []
    for k in range(len(cuts)):
        a, b = at[k], at[k + 1]
        labels += input_ids[a:b] if trained[k] else [IGNORE] * (b - a)
        if owner[k] is not None and b > a:
            ends.append((b, trained[k], owner[k] not in plan.unstopped))
    return Example(input_ids, labels, plan.source, plan.preserving, stop_appended=plan.appended,
                   unstopped=len(plan.unstopped), control_text=_control(plan, row)), ends


def _control(plan: _Plan, row: Row, grown=()) -> list[tuple[int, int]]:
    """Example.control_text: the tokens of `row` that spell the content's control tokens, shifted past the
    parts of the tokens re-spelt before them (`grown`: (token index, parts - 1))."""
    if not plan.control:
        return []
    return [tuple(i + sum(x for o, x in grown if o < i) for i in r) for r in controls.token_ranges(row, plan.control)]


def assemble_respelling(plan: _Plan, row: Row, tt: TextTokens, cuts, owner, trained):
    """`assemble` run by run and cut by cut, re-spelling a token that straddles a boundary as its parts;
    the reference the per-run path must equal."""
    text = plan.text
    input_ids, labels, last, respelt, grown, base = [], [], {}, 0, [], 0

    def emit(ids, reg):
        if ids:
            input_ids.extend(ids)
            labels.extend(ids if trained[reg] else [IGNORE] * len(ids))
            last[reg] = len(input_ids)

    for start, run in zip(*row):
        reg = bisect.bisect_right(cuts, start) - 1
        lo, hi = bisect.bisect_right(cuts, start), bisect.bisect_left(cuts, run.end(start))
        t, ci = 0, lo  # next token of the run to emit; next cut inside the run
        while ci < hi:
            c = cuts[ci]
            k = run.find(start, c)
            if k > t and run.span(start, k - 1)[1] > c:  # token k-1 straddles the boundary
                j = k - 1
                s, e = run.span(start, j)
                if run.atomic:
                    raise TemplateError(
                        f"{plan.source or 'conversation'}: the added token {text[s:e]!r} spans an answer "
                        "boundary; the template writes part of it inside the answer", reason="template error")
                group = [x for x in cuts[ci:hi] if x < e]
                bounds = [s] + group + [e]
                parts = [text[x:y] for x, y in zip(bounds, bounds[1:])]
                emit(run.ids[t:j], reg)
                n0 = len(input_ids)
                for n, part_ids in enumerate(tt.split_token(run.ids[j], parts) or map(tt.fragment_ids, parts)):
                    emit(part_ids, reg + n)
                grown.append((base + j, len(input_ids) - n0 - 1))
                reg += len(group)
                t, ci = k, ci + len(group)
                respelt += 1
            else:
                emit(run.ids[t:k], reg)
                t, ci, reg = max(t, k), ci + 1, reg + 1
        emit(run.ids[t:], reg)
        base += len(run.ids)
    ends = sorted((n, trained[k], owner[k] not in plan.unstopped) for k, n in last.items() if owner[k] is not None)
    return Example(input_ids, labels, plan.source, plan.preserving, respelt=respelt, stop_appended=plan.appended,
                   unstopped=len(plan.unstopped), control_text=_control(plan, row, grown)), ends
