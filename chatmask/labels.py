"""Assistant-only labels for any chat template: `encode(messages, tokenizer) -> Example`.

The conversation is rendered once with the template; the answer region of each assistant turn (the text
after its generation prompt through that turn's end-of-turn marker) is found from the template itself
(`spans.py`). The token stream follows one rule: `input_ids` are the tokenizer's encoding of the whole
rendering (what `apply_chat_template(tokenize=True)` feeds the model), cut at the answer boundaries by
the tokens' character spans; a token that would straddle a boundary is re-spelt as two (counted in
`Example.split`). `input_ids` and `labels` are built in the same loop; the piecewise encoding is checked
against the whole-text one by ids (`tokens.py`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .errors import ChatmaskError, ConfigError, ConversationError, TemplateError
from .messages import normalize_messages, weights as _weights
from .spans import Renderer, Turn, answer_regions, content_spans, renderer, resolve_template
from .tokens import TextTokens, text_tokens

__all__ = ["IGNORE", "Example", "check_template", "content_spans", "encode", "encode_many", "encode_turns",
           "normalize_messages", "renderer", "resolve_template", "truncate"]

IGNORE = -100
TRAIN_ON = ("assistant", "all", "last_assistant")
TRUNCATION = ("turns", "right", "drop")
VERIFY_ROWS = 4  # rows of each encode_many call whose ids are checked against a whole-text encoding


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

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


# ---------------------------------------------------------------- labelling


def _trained_turns(msgs, weights, turns: list[Turn], train_on, source) -> set[int]:
    if not turns:
        raise ConversationError(f"{source}: no assistant turn to train on", reason="no assistant turn")
    if train_on == "last_assistant":
        last = turns[-1].index
        if not weights[last]:
            raise ConversationError(
                f"{source}: the last assistant turn has weight 0; nothing to train on", reason="all weights 0"
            )
        return {last}
    chosen = {t.index for t in turns if weights[t.index]}
    if not chosen and train_on == "assistant":
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


def _assemble(plan: _Plan, enc, tt: TextTokens):
    """input_ids and labels built in one loop from the whole-text tokens, cut at the answer boundaries;
    also (token index just past each answer, whether it is trained) for truncation."""
    R = plan.text
    cuts, owner = [0], [None]  # region k is [cuts[k], cuts[k+1]) and belongs to answer owner[k] (None: prompt)
    for t in plan.turns:
        for pos, who in ((t.start, t.index), (t.end, None)):
            if pos == cuts[-1]:
                owner[-1] = who
            else:
                cuts.append(pos)
                owner.append(who)
    trained = [plan.train_on == "all" or w in plan.trained for w in owner]
    input_ids, labels, where, split = [], [], [], 0
    for k, (i, (s, e)) in enumerate(zip(enc.ids, enc.spans)):
        r0 = bisect.bisect_right(cuts, s) - 1
        r1 = bisect.bisect_right(cuts, e - 1) - 1 if e > s else r0  # region of the token's last character
        if r1 <= r0:
            pieces = [([i], r0)]
        elif k in enc.atomic:
            raise TemplateError(
                f"{plan.source or 'conversation'}: the added token {R[s:e]!r} spans an answer boundary; "
                "the template writes part of it inside the answer", reason="template error")
        else:  # a token straddles a boundary: re-spell its parts (the rule's one exception, counted)
            bounds = [s] + cuts[r0 + 1 : r1 + 1] + [e]
            parts = [R[a:b] for a, b in zip(bounds, bounds[1:])]
            ids = tt.split_token(i, parts) or [tt.fragment_ids(p) for p in parts]
            pieces = list(zip(ids, range(r0, r1 + 1)))
            split += 1
        for ids, reg in pieces:
            input_ids += ids
            labels += ids if trained[reg] else [IGNORE] * len(ids)
            where += [reg] * len(ids)
    last = {reg: n + 1 for n, reg in enumerate(where)}
    ends = sorted((last[k], trained[k]) for k in last if owner[k] is not None)
    return Example(input_ids, labels, plan.source, plan.preserving, split=split), ends


def encode_many(rows, tokenizer, *, train_on="assistant", max_length=None, template=None, truncation="turns"):
    """`encode` over many `(messages, source)` rows with one tokenizer call for all of them (the fast
    tokenizer's batch API uses every core). Returns, per row, an Example or the ChatmaskError that row
    raised."""
    _check_options(train_on, truncation)
    r = renderer(tokenizer, template)
    plans = []
    for messages, source in rows:
        try:
            plans.append(_plan_row(r, messages, source, train_on))
        except ChatmaskError as e:
            plans.append(e)
    return _finish(plans, r, tokenizer, max_length, truncation)


def _finish(plans, r: Renderer, tokenizer, max_length, truncation):
    tt = text_tokens(tokenizer)
    live = [p for p in plans if not isinstance(p, ChatmaskError)]
    encs = tt.encode([p.text for p in live])
    if tt.piecewise and live:
        k = min(VERIFY_ROWS, len(live))
        if not tt.same_as_whole([p.text for p in live[:k]], encs[:k]):
            # a case the probe missed: encode whole texts from now on, for every row
            tt.piecewise = False
            encs = tt.encode([p.text for p in live])
    it = iter(encs)
    out = []
    for plan in plans:
        if isinstance(plan, ChatmaskError):
            out.append(plan)
            continue
        try:
            ex, ends = _assemble(plan, next(it), tt)
            if max_length is not None and len(ex.input_ids) > max_length:
                ex = truncate(ex, max_length, truncation, ends)
            out.append(ex)
        except ChatmaskError as e:
            out.append(e)
    r.warn_once()
    return out


def _check_options(train_on, truncation):
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION)}, not {truncation!r}")


def _plan_row(r: Renderer, messages, source, train_on) -> _Plan:
    where = source or "conversation"
    msgs = normalize_messages(messages, source)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(f"{where}: no assistant turn", reason="no assistant turn")
    R = r.render(msgs, source=source)
    turns = answer_regions(r, msgs, R, where)
    trained = _trained_turns(msgs, _weights(messages), turns, train_on, where)
    return _Plan(source, R, turns, trained, train_on, all(t.preserving for t in turns))


def truncate(ex: Example, max_length: int, policy: str, turn_ends) -> Example:
    """Cut `ex` to `max_length` tokens by `policy` (see TRUNCATION); raises ConversationError when the
    row must be dropped. `turn_ends`: (token index just past an answer, whether it is trained)."""
    where = f"{ex.source}: " if ex.source else ""
    n = len(ex.input_ids)
    if policy == "drop":
        raise ConversationError(f"{where}{n} tokens exceed max_length {max_length}", reason="too long")
    if policy == "turns":
        fits = [e for e, trained in turn_ends if e <= max_length]
        if not any(trained for e, trained in turn_ends if e <= max_length):
            raise ConversationError(
                f"{where}the first trained answer ends at token {next((e for e, t in turn_ends if t), n)}, "
                f"past max_length {max_length}",
                reason="first answer too long",
            )
        cut = max(fits)
    elif policy == "right":
        cut = max_length
    else:
        raise ConfigError(f"truncation must be one of {', '.join(TRUNCATION)}, not {policy!r}")
    out = Example(ex.input_ids[:cut], ex.labels[:cut], ex.source, ex.prefix_preserving, n - cut)
    if out.num_trained == 0:
        raise ConversationError(f"{where}no trained token left after cutting to {max_length}", reason="too long")
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
) -> Example:
    """Render `messages` with the chat template and label each assistant answer (its text after the
    generation prompt through the end-of-turn marker); everything else is -100.

    >>> ex = encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tok)
    >>> tok.decode([t for t in ex.labels if t != -100])
    'Hello!<|im_end|>'
    """
    out = encode_many([(messages, source)], tokenizer, train_on=train_on, max_length=max_length,
                      template=template, truncation=truncation)[0]
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
) -> list[Example]:
    """One example per trained assistant turn: prompt = that turn's generation prompt exactly as at
    inference, only that turn trained. The faithful form for templates that rewrite earlier turns."""
    msgs = normalize_messages(messages, source)
    weights = _weights(messages)
    r = renderer(tokenizer, template)
    where = source or "conversation"
    plans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not weights[i]:
            continue
        sub = msgs[: i + 1]
        R = r.render(sub, source=source)
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
    out = _finish(plans, r, tokenizer, max_length, "turns")
    for e in out:
        if isinstance(e, ChatmaskError):
            raise e
    return out


def check_template(tokenizer, template: str | None = None) -> list[str]:
    """Problems and notes about how a template can be trained, e.g. `not prefix-preserving: ...`.
    An empty list means: prefix-preserving, with an end-of-turn marker that is trained."""
    r = renderer(tokenizer, template)
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
                f"{len(text_tokens(tokenizer).whole([stripped])[0].ids)} ordinary tokens: add it "
                "(chatmask.add_template_tokens) or use the model's own template"
            )
        elif eos and eos not in r.marker:
            notes.append(
                f"end-of-turn marker {r.marker!r} is trained but is not the tokenizer's eos_token {eos!r}: "
                "make generation stop on it (generation_config.eos_token_id)"
            )
    if r.gen_prompt_empty:
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
            R = r.render(msgs)
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


def clear_caches() -> None:
    """Forget every compiled template, skeleton and segment memo (benchmarks start each repeat cold)."""
    from . import spans, tokens

    spans._renderers.clear()
    tokens.clear()
