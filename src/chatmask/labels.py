"""Assistant-only labels for any chat template: `encode(messages, tokenizer) -> Example`.

The conversation is rendered once with the template; the answer region of each assistant turn (the text
after its generation prompt through that turn's end-of-turn marker) is found from the template itself
(`spans.py`). The token stream follows one rule: `input_ids` are the tokenizer's encoding of the whole
rendering (what `apply_chat_template(tokenize=True)` feeds the model), cut at the answer boundaries by
the tokens' character spans; a token that would straddle a boundary is re-spelt as two (counted in
`Example.split`). `input_ids` and `labels` are built in the same loop; the piecewise encoding is checked
against the whole-text one by ids (`tokens.py`). `select` makes the `all` and `last_assistant` arms from
assistant labels, here and in training alike.
"""

from __future__ import annotations

import bisect
import gc
import itertools
from dataclasses import dataclass

from .errors import ChatmaskError, ConfigError, ConversationError, TemplateError
from .messages import normalize_messages, weights as _weights
from .spans import Renderer, Turn, answer_regions, content_spans, renderer, resolve_template
from .tokens import TextTokens, text_tokens

__all__ = ["IGNORE", "LENGTH_REASONS", "Example", "check_template", "content_spans", "encode", "encode_many", "encode_turns",
           "normalize_messages", "renderer", "resolve_template", "select", "truncate"]

IGNORE = -100
TRAIN_ON = ("assistant", "all", "last_assistant")
TRUNCATION = ("turns", "right", "drop")
TOO_LONG, FIRST_ANSWER, NOTHING_TRAINED = "longer than max_length", "first answer past max_length", \
    "nothing trained within max_length"
LENGTH_REASONS = (TOO_LONG, FIRST_ANSWER, NOTHING_TRAINED)
"""Why truncation drops a row: the outcome of --max-length and --truncation, not a bad row, so such rows
are always dropped and counted (never an error), by prepare, train, compare and demo alike."""
STREAMS = ("rendering", "segments")
"""The token stream: `rendering`, the tokenizer's encoding of the whole rendered text (what
`apply_chat_template(tokenize=True)` feeds the model), a token that straddles a prompt/answer boundary
re-spelt as its two parts; or `segments`, each prompt and answer segment encoded as a text of its own, the
way mistral-common (and mistral-finetune) encode a conversation: a SentencePiece tokenizer then gives each
segment its dummy prefix."""


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
    split: int = 0
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


# ---------------------------------------------------------------- labelling


def select(input_ids: list[int], labels: list[int], train_on: str) -> list[int]:
    """The labels of one `train_on` arm from a row's assistant labels: the one definition of the switch,
    used by `encode` and by training on prepared rows (which hold assistant labels) alike. `assistant`:
    as they are; `all`: every token (the unmasked baseline); `last_assistant`: the last trained answer
    that is left (after weights and truncation), i.e. the last run of trained tokens."""
    if train_on == "assistant":
        return labels
    if train_on == "all":
        return list(input_ids)
    if train_on == "last_assistant":
        end = max((i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), default=-1)
        start = end
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
        return [IGNORE] * start + labels[start : end + 1] + [IGNORE] * (len(labels) - end - 1)
    raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")


def _trained_turns(msgs, weights, turns: list[Turn], train_on, source) -> set[int]:
    """The answers the assistant labels train (weight 1); `select` then makes the other arms from them."""
    if not turns:
        raise ConversationError(f"{source}: no assistant turn to train on", reason="no assistant turn")
    chosen = {t.index for t in turns if weights[t.index]}
    if not chosen and train_on != "all":
        raise ConversationError(f"{source}: every assistant turn has weight 0; nothing to train on", reason="all weights 0")
    return chosen


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


def _assemble(plan: _Plan, row, tt: TextTokens):
    """input_ids and labels from the whole-text tokens cut at the answer boundaries; also (token index
    just past each answer, whether it is trained) for truncation. Works per run of tokens, not per
    token: a row costs a few list copies. A row where a token straddles a boundary goes the slow way."""
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
            return _assemble_split(plan, row, tt, cuts, owner, trained)
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


def _assemble_split(plan: _Plan, row, tt: TextTokens, cuts, owner, trained):
    """`_assemble` for a row where a token straddles a boundary: that token is re-spelt as its parts."""
    R = plan.text
    input_ids, labels, last, split = [], [], {}, 0

    def emit(ids, reg):
        if ids:
            input_ids.extend(ids)
            labels.extend(ids if trained[reg] else [IGNORE] * len(ids))
            last[reg] = len(input_ids)

    for start, p in zip(*row):
        reg = bisect.bisect_right(cuts, start) - 1
        lo, hi = bisect.bisect_right(cuts, start), bisect.bisect_left(cuts, p.end(start))
        t, ci = 0, lo  # next token of p to emit; next cut inside p
        while ci < hi:
            c = cuts[ci]
            k = p.find(start, c)
            if k > t and p.span(start, k - 1)[1] > c:  # token k-1 straddles the boundary
                j = k - 1
                s, e = p.span(start, j)
                if p.atomic:
                    raise TemplateError(
                        f"{plan.source or 'conversation'}: the added token {R[s:e]!r} spans an answer boundary; "
                        "the template writes part of it inside the answer", reason="template error")
                group = [x for x in cuts[ci:hi] if x < e]
                bounds = [s] + group + [e]
                parts = [R[x:y] for x, y in zip(bounds, bounds[1:])]
                emit(p.ids[t:j], reg)
                for n, part_ids in enumerate(tt.split_token(p.ids[j], parts) or [tt.fragment_ids(x) for x in parts]):
                    emit(part_ids, reg + n)
                reg += len(group)
                t, ci = k, ci + len(group)
                split += 1
            else:
                emit(p.ids[t:k], reg)
                t, ci, reg = max(t, k), ci + 1, reg + 1
        emit(p.ids[t:], reg)
    ends = sorted((n, trained[k], owner[k] not in plan.unstopped) for k, n in last.items() if owner[k] is not None)
    return Example(input_ids, labels, plan.source, plan.preserving, split=split, stop_appended=plan.appended,
                   unstopped=len(plan.unstopped)), ends


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
        return _finish(plans, r, tokenizer, max_length, truncation, stream)
    finally:
        if gc_on:
            gc.enable()


def _finish(plans, r: Renderer, tokenizer, max_length, truncation, stream="rendering"):
    tt = text_tokens(tokenizer)
    live = [p for p in plans if not isinstance(p, ChatmaskError)]
    if stream == "rendering":  # the texts to encode (a row's rendering, or its segments), and their row
        texts, owner = [p.text for p in live], range(len(live))
    else:
        texts, owner = [], []
        for k, p in enumerate(live):
            row = _segments(p)
            texts += row
            owner += [k] * len(row)
    encs = tt.encode(texts)
    if tt.piecewise and live:
        due = {k for k in range(len(live)) if tt.due_for_check()}
        picked = [j for j, k in enumerate(owner) if k in due]
        if picked and not tt.same_as_whole([texts[j] for j in picked], [encs[j] for j in picked]):
            # a case the probe missed: encode whole texts from now on, for every row
            tt.piecewise = False
            encs = tt.encode(texts)
    it = iter(encs)
    out = []
    for plan in plans:
        if isinstance(plan, ChatmaskError):
            out.append(plan)
            continue
        try:
            if stream == "rendering":
                row = next(it)
            else:  # each segment encoded as a text of its own, placed where it stands in the rendering
                row, pos = ([], []), 0
                for seg in _segments(plan):
                    starts, runs = next(it)
                    row[0].extend(s + pos for s in starts)
                    row[1].extend(runs)
                    pos += len(seg)
            ex, ends = _assemble(plan, row, tt)
            if max_length is not None and len(ex.input_ids) > max_length:
                ex = truncate(ex, max_length, truncation, ends, plan.train_on)
            if plan.train_on != "assistant":
                ex.labels = select(ex.input_ids, ex.labels, plan.train_on)
            out.append(ex)
        except ChatmaskError as e:
            out.append(e)
    r.warn_once()
    return out


def _segments(plan: _Plan) -> list[str]:
    """The rendering cut at its answer boundaries (the 'segments' token stream)."""
    cuts = _regions(plan)[0] + [len(plan.text)]
    return [plan.text[a:b] for a, b in zip(cuts, cuts[1:])]


def _check_options(train_on, truncation, stream="rendering"):
    if stream not in STREAMS:
        raise ConfigError(f"stream must be one of {', '.join(STREAMS)}, not {stream!r}")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION)}, not {truncation!r}")


def _plan_row(r: Renderer, messages, source, train_on) -> _Plan:
    where = source or "conversation"
    msgs = normalize_messages(messages, source)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(f"{where}: no assistant turn", reason="no assistant turn")
    R = r.training_text(msgs, source=source)
    turns = answer_regions(r, msgs, R, where)
    trained = _trained_turns(msgs, _weights(messages), turns, train_on, where)
    unstopped = frozenset(t.index for t in turns if t.index in trained and
                          r.context(msgs[t.index + 1]["role"] if t.index + 1 < len(msgs) else None) in r.unstopped)
    return _Plan(source, R, turns, trained, train_on, all(t.preserving for t in turns),
                 bool(r.append) and msgs[-1]["role"] == "assistant", unstopped)


def truncate(ex: Example, max_length: int, policy: str, turn_ends, train_on: str = "assistant") -> Example:
    """Cut `ex` to `max_length` tokens by `policy` (see TRUNCATION); raises ConversationError when the
    row must be dropped. `turn_ends`: (token index just past an answer, whether it is trained, whether its
    end holds a stop); `ex` holds assistant labels, and `train_on="all"` trains every token, so any answer
    that fits will do."""
    where = f"{ex.source}: " if ex.source else ""
    n = len(ex.input_ids)
    answers = turn_ends
    if train_on == "all":
        turn_ends = [(e, True, stopped) for e, _, stopped in turn_ends]
    if policy == "drop":
        raise ConversationError(f"{where}{n:,} tokens, longer than max_length {max_length:,}: raise --max-length, "
                                "or --truncation turns keeps the leading turns that fit", reason=TOO_LONG)
    if policy == "turns":
        fits = [e for e, trained, _ in turn_ends if e <= max_length]
        if not any(trained for e, trained, _ in turn_ends if e <= max_length):
            raise ConversationError(
                f"{where}the first trained answer ends at token {next((e for e, t, _ in turn_ends if t), n):,}, "
                f"past max_length {max_length:,}: raise --max-length to keep the row", reason=FIRST_ANSWER)
        cut = max(fits)
    elif policy == "right":
        cut = max_length
    else:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION)}, not {policy!r}")
    kept = [(e, stopped) for e, trained, stopped in answers if e <= cut and trained]
    cut_answer = ex.labels[cut - 1] != IGNORE and cut not in {e for e, _ in kept}  # its stop is cut off
    unstopped = sum(not stopped for _, stopped in kept) + cut_answer
    out = Example(ex.input_ids[:cut], ex.labels[:cut], ex.source, ex.prefix_preserving, n - cut, ex.split,
                  ex.stop_appended and cut == n, unstopped)
    if out.num_trained == 0 and train_on != "all":
        raise ConversationError(f"{where}no trained token in the first {max_length:,} tokens: raise --max-length "
                                "to keep the row", reason=NOTHING_TRAINED)
    return out


# ---------------------------------------------------------------- public


def encode(
    messages,
    tokenizer,
    *,
    train_on: str = "assistant",
    max_length: int | None = None,
    template: str | None = None,
    truncation: str = "turns",
    source: str = "",
    end_of_turn: str | None = None,
    stream: str = "rendering",
    stop_tokens=(),
) -> Example:
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


def encode_turns(
    messages,
    tokenizer,
    *,
    max_length: int | None = None,
    template: str | None = None,
    source: str = "",
    end_of_turn: str | None = None,
    stream: str = "rendering",
    stop_tokens=(),
) -> list[Example]:
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
        R = r.training_text(sub, source=source)
        turn = answer_regions(r, sub, R, where)[-1]
        G = r.render(msgs[:i], True, source=source) if not r.gen_prompt_empty else R[: turn.start]
        if R.startswith(G) and len(G) <= turn.start:
            answer = R[len(G) : turn.end]
        else:  # the generation prompt differs from the rendered turn (e.g. it opens <think>): prompt as
            answer = R[turn.start : turn.end]  # at inference, then the turn's rendered answer
        T = G + answer
        plans.append(_Plan(f"{source}#turn{i}" if source else f"turn{i}", T, [Turn(i, len(G), len(T), True)],
                           {i}, "assistant", True))
    if not plans:
        raise ConversationError(f"{where}: no assistant turn to train on", reason="no assistant turn")
    out = _finish(plans, r, tokenizer, max_length, "turns", stream)
    for e in out:
        if isinstance(e, ChatmaskError):
            raise e
    return out


def check_template(tokenizer, template: str | None = None, end_of_turn: str | None = None, stop_tokens=()) -> list[str]:
    """Problems and notes about how a template can be trained, e.g. `not prefix-preserving: ...`.
    An empty list means: prefix-preserving, with an end-of-turn marker that is trained."""
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    notes = list(r.notes)
    if not r.marker:
        notes.append(
            "no end-of-turn marker: nothing follows each answer, so only the content is trained and the model "
            "is not taught to stop"
        )
    else:
        eos = getattr(tokenizer, "eos_token", None)
        stripped = r.marker.strip()
        if stripped and stripped not in r.specials:
            notes.append(
                f"end-of-turn marker {r.marker!r} is not a special token of this tokenizer, so it is trained as "
                f"{len(text_tokens(tokenizer).whole_ids([stripped])[0])} ordinary tokens: add it "
                "(chatmask.add_template_tokens) or use the model's own template"
            )
        elif eos and eos not in r.marker:
            notes.append(
                f"end-of-turn marker {r.marker!r} is trained but is not the tokenizer's eos_token {eos!r}: "
                "generation must stop on it (a model chatmask saves lists it in generation_config.json)"
            )
    notes += _stop_notes(r)
    if r.gen_prompt_empty and r.gen_always:
        notes.append("the template ignores add_generation_prompt and always ends with the assistant header: answers "
                     "are trained from the end of that header")
    elif r.gen_prompt_empty:
        notes.append(
            "add_generation_prompt renders nothing: answers are trained from their content, the assistant header is not"
        )
    probes = {
        "user/assistant x2": ["user", "assistant", "user", "assistant"],
        "system first": ["system", "user", "assistant", "user", "assistant"],
        "tool message": ["user", "assistant", "tool", "assistant"],
    }
    for name, roles in probes.items():
        msgs = [{"role": ro, "content": f"text {j}"} for j, ro in enumerate(roles)]
        try:
            R = r.training_text(msgs)
        except TemplateError as e:
            notes.append(f"raises on a conversation with {name}: {str(e).split(': ', 1)[-1]}")
            continue
        try:
            turns = answer_regions(r, msgs, R, name)
        except TemplateError as e:
            notes.append(f"cannot label a conversation with {name}: {e}")
            continue
        if not all(t.preserving for t in turns):
            notes.append(
                f"not prefix-preserving ({name}): the template renders earlier turns differently from the "
                "generation prompt they were answered from; encode() trains each turn as rendered in the full "
                "conversation, encode_turns() gives one faithful example per turn"
            )
    for m in ("{% generation %}", "{%- generation %}", "{% generation -%}"):
        if m in r.text:
            notes.append("has {% generation %} tags: chatmask does not need them (labels come from the rendering)")
            break
    return notes


def _stop_notes(r: Renderer) -> list[str]:
    """What check_template says about the stops: an appended one, contexts that train none."""
    notes = []
    if r.append:
        notes.append(f"the template writes no end of turn after the last answer: its stop {r.append!r} is appended "
                     "there (the model writes it at inference), and counted (rows_stop_appended)")
    for ctx in sorted(r.unstopped - {"last"} if r.marker else set()):
        notes.append(f"no stop after an answer followed by a {ctx} message: such answers are trained without one "
                     "(rows_without_trained_stop counts them); pass --stop-tokens with the model's stop list")
    return notes


def clear_caches() -> None:
    """Forget every compiled template, skeleton and segment memo (benchmarks start each repeat cold)."""
    from . import spans, tokens

    spans._renderers.clear()
    tokens.clear()
