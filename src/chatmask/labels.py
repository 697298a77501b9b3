"""Assistant-only labels for any chat template: `encode(messages, tokenizer) -> Example`.

Reading order: the reference path first, the plain way a conversation becomes ids and labels.
1. `_plan_row` renders it with the template (`Renderer.training_text`) and finds each answer's region, the
   text after its generation prompt through its end of turn, by rendering with one answer at a time replaced
   by a sentinel and diffing (`spans._turns_slow`; what ends a turn is `markers.py`'s).
2. `_token_rows` encodes each whole rendering (`TextTokens.whole`: what `apply_chat_template(tokenize=True)`
   feeds the model; `--stream segments` encodes each prompt and answer segment alone instead, see STREAMS).
3. `_assemble_respelling` cuts those tokens at the answer boundaries, building `input_ids` and `labels` in one
   loop; a token that straddles a boundary is re-spelt as its parts (counted in `Example.respelt`).
4. `truncation.truncate` applies --max-length and --truncation; `apply_train_on` makes the `all` and
   `last_assistant` arms from the assistant labels, here and in training alike.
The fast paths, each checked against that reference by a test:
- answer regions read off a skeleton cached per conversation shape (`spans._turns_fast`):
  tests/test_labels.py::test_row_by_row_path_agrees_with_cached_skeleton;
- tokens encoded piecewise between added tokens and memoized (`TextTokens._piecewise`), checked by ids on
  probes and on sampled rows (`_sampled_rows_agree`): tests/test_tokens.py::test_piecewise_equals_whole_text,
  ::test_a_wrong_memo_is_caught_by_ids_and_every_row_encoded_whole;
- labels assembled per run of tokens (`_assemble`; a row where a token straddles a boundary takes step 3):
  tests/test_labels.py::test_respelling_path_agrees_with_run_assembly;
- the compiled template and the token view kept per tokenizer (`spans.renderer`, `tokens.text_tokens`).
"""

from __future__ import annotations

import bisect
import gc
import itertools
from dataclasses import dataclass

from .config import STREAMS, TRAIN_ON, TRUNCATION
from .errors import ChatmaskError, ConfigError, ConversationError, TemplateError
from .messages import normalize_messages, weights as _weights
from .spans import Renderer, Turn, answer_regions, content_spans, renderer, resolve_template
from .template_checks import check_template
from .tokens import Row, TextTokens, text_tokens
from .truncation import LENGTH_REASONS, truncate

__all__ = ["IGNORE", "LENGTH_REASONS", "Example", "apply_train_on", "check_template", "content_spans", "encode",
           "encode_many", "encode_turns", "normalize_messages", "renderer", "resolve_template", "truncate"]

IGNORE = -100
# STREAMS (config.STREAMS), the token stream: `rendering`, the tokenizer's encoding of the whole rendered text (what
# `apply_chat_template(tokenize=True)` feeds the model), a token that straddles a prompt/answer boundary
# re-spelt as its two parts; or `segments`, each prompt and answer segment encoded as a text of its own, the
# way mistral-common (and mistral-finetune) encode a conversation: a SentencePiece tokenizer then gives each
# segment its dummy prefix.


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

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _check_choice(name: str, value, choices) -> None:
    """The one check of an option's spelling (config's: TRAIN_ON, TRUNCATION; STREAMS)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_options(train_on, truncation, stream="rendering") -> None:
    _check_choice("stream", stream, STREAMS)
    _check_choice("train_on", train_on, TRAIN_ON)
    _check_choice("truncation", truncation, TRUNCATION)


def apply_train_on(input_ids: list[int], labels: list[int], train_on: str) -> list[int]:
    """The labels of one `train_on` arm from a row's assistant labels: the one definition of the switch,
    used by `encode` and by training on prepared rows (which hold assistant labels) alike. `assistant`:
    as they are; `all`: every token (the unmasked baseline); `last_assistant`: the last trained answer
    that is left (after weights and truncation), i.e. the last run of trained tokens."""
    _check_choice("train_on", train_on, TRAIN_ON)
    if train_on == "all":
        return list(input_ids)
    if train_on == "last_assistant":
        end = max((i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), default=-1)
        start = end
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
        return [IGNORE] * start + labels[start : end + 1] + [IGNORE] * (len(labels) - end - 1)
    return labels


# ---------------------------------------------------------------- a row rendered: its plan


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


def _plan_row(r: Renderer, messages, source, train_on) -> _Plan:
    where = source or "conversation"
    msgs = normalize_messages(messages, source)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(f"{where}: no assistant turn", reason="no assistant turn")
    rendering = r.training_text(msgs, source=source)
    turns = answer_regions(r, msgs, rendering, where)
    trained = _trained_turns(_weights(messages), turns, train_on, where)
    next_roles = [msgs[t.index + 1]["role"] if t.index + 1 < len(msgs) else None for t in turns]
    unstopped = frozenset(t.index for t, nxt in zip(turns, next_roles)
                          if t.index in trained and r.context(nxt) in r.unstopped)
    return _Plan(source, rendering, turns, trained, train_on, all(t.preserving for t in turns),
                 bool(r.append) and msgs[-1]["role"] == "assistant", unstopped)


def _trained_turns(weights, turns: list[Turn], train_on, source) -> set[int]:
    """The answers the assistant labels train (weight 1); `apply_train_on` then makes the other arms."""
    if not turns:
        raise ConversationError(f"{source}: no assistant turn to train on", reason="no assistant turn")
    chosen = {t.index for t in turns if weights[t.index]}
    if not chosen and train_on != "all":
        raise ConversationError(f"{source}: every assistant turn has weight 0; nothing to train on",
                                reason="all weights 0")
    return chosen


def _regions(plan: _Plan):
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


def _segments(plan: _Plan) -> list[str]:
    """The rendering cut at its answer boundaries (the 'segments' token stream)."""
    cuts = _regions(plan)[0] + [len(plan.text)]
    return [plan.text[a:b] for a, b in zip(cuts, cuts[1:])]


# ---------------------------------------------------------------- tokens to input_ids and labels


def _assemble(plan: _Plan, row: Row, tt: TextTokens):
    """input_ids and labels from the whole-text tokens cut at the answer boundaries; also (token index
    just past each answer, whether it is trained, whether its end holds a stop) for truncation. Works per
    run of tokens, not per token: a row costs a few list copies. A row where a token straddles a boundary
    goes the reference way (`_assemble_respelling`)."""
    cuts, owner, trained = _regions(plan)
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
            return _assemble_respelling(plan, row, tt, cuts, owner, trained)
        at.append(firsts[k] + j)
    at.append(len(input_ids))
    labels, ends = [], []
    for k in range(len(cuts)):
        a, b = at[k], at[k + 1]
        labels += input_ids[a:b] if trained[k] else [IGNORE] * (b - a)
        if owner[k] is not None and b > a:
            ends.append((b, trained[k], owner[k] not in plan.unstopped))
    return Example(input_ids, labels, plan.source, plan.preserving, stop_appended=plan.appended,
                   unstopped=len(plan.unstopped)), ends


def _assemble_respelling(plan: _Plan, row: Row, tt: TextTokens, cuts, owner, trained):
    """`_assemble` run by run and cut by cut, re-spelling a token that straddles a boundary as its parts;
    the reference the per-run path must equal."""
    text = plan.text
    input_ids, labels, last, respelt = [], [], {}, 0

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
                for n, part_ids in enumerate(tt.split_token(run.ids[j], parts) or map(tt.fragment_ids, parts)):
                    emit(part_ids, reg + n)
                reg += len(group)
                t, ci = k, ci + len(group)
                respelt += 1
            else:
                emit(run.ids[t:k], reg)
                t, ci, reg = max(t, k), ci + 1, reg + 1
        emit(run.ids[t:], reg)
    ends = sorted((n, trained[k], owner[k] not in plan.unstopped) for k, n in last.items() if owner[k] is not None)
    return Example(input_ids, labels, plan.source, plan.preserving, respelt=respelt, stop_appended=plan.appended,
                   unstopped=len(plan.unstopped)), ends


# ---------------------------------------------------------------- many rows, one tokenizer call


def _encode_plans(plans, r: Renderer, tokenizer, max_length, truncation, stream="rendering") -> list:
    """Each plan (or the error its row raised) -> its Example (or the error): the tokens of every row in
    one tokenizer call, then each row assembled, truncated and given its train_on arm."""
    tt = text_tokens(tokenizer)
    token_rows = iter(_token_rows([p for p in plans if not isinstance(p, ChatmaskError)], tt, stream))
    out = []
    for plan in plans:
        if isinstance(plan, ChatmaskError):
            out.append(plan)
            continue
        try:
            ex, ends = _assemble(plan, next(token_rows), tt)
            if max_length is not None and len(ex.input_ids) > max_length:
                ex = truncate(ex, max_length, truncation, ends, plan.train_on)
            if plan.train_on != "assistant":
                ex.labels = apply_train_on(ex.input_ids, ex.labels, plan.train_on)
            out.append(ex)
        except ChatmaskError as e:
            out.append(e)
    r.warn_once()
    return out


def _token_rows(plans: list[_Plan], tt: TextTokens, stream: str) -> list[Row]:
    """The tokens of each plan's rendering, placed at their characters in it: one encoding of all the texts
    (the whole renderings, or for `segments` each segment alone, shifted to where it stands)."""
    if stream == "rendering":
        texts, owner = [p.text for p in plans], list(range(len(plans)))
    else:
        texts, owner = [], []
        for k, p in enumerate(plans):
            segments = _segments(p)
            texts += segments
            owner += [k] * len(segments)
    encs = tt.encode(texts)
    if tt.piecewise and plans and not _sampled_rows_agree(tt, texts, owner, encs, len(plans)):
        tt.piecewise = False  # a case the probe missed: encode whole texts from now on, for every row
        encs = tt.encode(texts)
    if stream == "rendering":
        return encs
    rows, pos = [([], []) for _ in plans], [0] * len(plans)
    for k, text, (starts, runs) in zip(owner, texts, encs):
        rows[k][0].extend(s + pos[k] for s in starts)
        rows[k][1].extend(runs)
        pos[k] += len(text)
    return rows


def _sampled_rows_agree(tt: TextTokens, texts, owner, encs, n_rows: int) -> bool:
    """Whether the piecewise encodings of the rows `due_for_check` picks equal their whole-text ones."""
    due = {k for k in range(n_rows) if tt.due_for_check()}
    picked = [j for j, k in enumerate(owner) if k in due]
    return not picked or tt.same_as_whole([texts[j] for j in picked], [encs[j] for j in picked])


def encode_many(rows, tokenizer, *, train_on="assistant", max_length=None, template=None, truncation="turns",
                end_of_turn=None, stream="rendering", stop_tokens=()):
    """`encode` over many `(messages, source)` rows with one tokenizer call for all of them (the fast
    tokenizer's batch API uses every core). Returns, per row, an Example or the ChatmaskError that row
    raised."""
    _check_options(train_on, truncation, stream)
    text_tokens(tokenizer)  # an unusable tokenizer is said before anything about its template
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    # a batch allocates many short-lived lists; the cyclic collector's passes over them (and over the
    # memo) would cost about a third of the time, and nothing here makes cycles
    gc_on = gc.isenabled()
    gc.disable()
    try:
        plans = []
        for messages, source in rows:
            try:
                plans.append(_plan_row(r, messages, source, train_on))
            except ChatmaskError as e:
                plans.append(e)
        return _encode_plans(plans, r, tokenizer, max_length, truncation, stream)
    finally:
        if gc_on:
            gc.enable()


# ---------------------------------------------------------------- public


def encode(messages, tokenizer, *, train_on: str = "assistant", max_length: int | None = None,
           template: str | None = None, truncation: str = "turns", source: str = "", end_of_turn: str | None = None,
           stream: str = "rendering", stop_tokens=()) -> Example:
    """Render `messages` with the chat template and label each assistant answer (its text after the
    generation prompt through the end-of-turn marker); everything else is -100. `input_ids` are the
    tokenizer's encoding of the whole rendering (see STREAMS for the one exception and the alternative);
    `end_of_turn` names the marker where the template leaves it ambiguous; `stop_tokens` are the model's
    own stop list (its generation_config.json `eos_token_id`, as strings: `hub.model_stop_tokens`), which
    the end of each turn is read with (README, "The stop").

    >>> ex = encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tok)
    >>> tok.decode([t for t in ex.labels if t != -100])
    'Hello!<|im_end|>'
    """
    out = encode_many([(messages, source)], tokenizer, train_on=train_on, max_length=max_length,
                      template=template, truncation=truncation, end_of_turn=end_of_turn, stream=stream,
                      stop_tokens=stop_tokens)[0]
    if isinstance(out, ChatmaskError):
        raise out
    return out


def encode_turns(messages, tokenizer, *, max_length: int | None = None, template: str | None = None,
                 source: str = "", end_of_turn: str | None = None, stream: str = "rendering",
                 stop_tokens=()) -> list[Example]:
    """One example per trained assistant turn: prompt = that turn's generation prompt exactly as at
    inference, only that turn trained. The faithful form for templates that rewrite earlier turns."""
    _check_options("assistant", "turns", stream)
    text_tokens(tokenizer)
    msgs = normalize_messages(messages, source)
    weights = _weights(messages)
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    where = source or "conversation"
    plans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not weights[i]:
            continue
        sub = msgs[: i + 1]
        rendering = r.training_text(sub, source=source)
        turn = answer_regions(r, sub, rendering, where)[-1]
        prompt = r.render(msgs[:i], True, source=source) if not r.gen_prompt_empty else rendering[: turn.start]
        if rendering.startswith(prompt) and len(prompt) <= turn.start:
            answer = rendering[len(prompt) : turn.end]
        else:  # the generation prompt differs from the rendered turn (e.g. it opens <think>): prompt as
            answer = rendering[turn.start : turn.end]  # at inference, then the turn's rendered answer
        text = prompt + answer
        plans.append(_Plan(f"{source}#turn{i}" if source else f"turn{i}", text,
                           [Turn(i, len(prompt), len(text), True)], {i}, "assistant", True))
    if not plans:
        raise ConversationError(f"{where}: no assistant turn to train on", reason="no assistant turn")
    out = _encode_plans(plans, r, tokenizer, max_length, "turns", stream)
    for e in out:
        if isinstance(e, ChatmaskError):
            raise e
    return out


def clear_caches() -> None:
    """Forget every compiled template, skeleton and segment memo (benchmarks start each repeat cold)."""
    from . import spans, tokens

    spans._renderers.clear()
    tokens.clear()
