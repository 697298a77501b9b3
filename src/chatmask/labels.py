"""Assistant-only labels for any chat template: `encode(messages, tokenizer) -> Example`.

Reading order: the reference path first, the plain way a conversation becomes ids and labels.
1. `_plan_row` renders it with the template (`Renderer.training_text`) and finds each answer's region, the
   text after its generation prompt through its end of turn, by rendering with one answer at a time replaced
   by a sentinel and diffing (`spans._turns_slow`; what ends a turn is `markers.py`'s).
2. `_token_rows` encodes each whole rendering (`TextTokens.whole`: what `apply_chat_template(tokenize=True)`
   feeds the model; `--stream segments` encodes each prompt and answer segment alone instead, see STREAMS).
3. `assembly.assemble_respelling` cuts those tokens at the answer boundaries, building `input_ids` and `labels`
   in one loop; a token that straddles a boundary is re-spelt as its parts (counted in `Example.respelt`).
4. `truncation.truncate` applies --max-length and --truncation; `apply_train_on` makes the `all` and
   `last_assistant` arms from the assistant labels, here and in training alike.
The fast paths, each checked against that reference by a test:
- answer regions read off a skeleton cached per conversation shape (`spans._turns_fast`):
  tests/test_labels.py::test_row_by_row_path_agrees_with_cached_skeleton;
- tokens encoded piecewise between added tokens and memoized (`TextTokens._piecewise`), checked by ids on
  probes and on sampled rows (`_sampled_rows_agree`): tests/test_tokens.py::test_piecewise_equals_whole_text,
  ::test_a_wrong_memo_is_caught_by_ids_and_every_row_encoded_whole;
- labels assembled per run of tokens (`assembly.assemble`; a row where a token straddles a boundary takes step 3):
  tests/test_labels.py::test_respelling_path_agrees_with_run_assembly;
- the compiled template and the token view kept per tokenizer (`spans.renderer`, `tokens.text_tokens`).
Control tokens that a message's content writes are found in step 1 and encoded by --control-tokens in step 2
(`controls.py`): as plain text by default.
"""

from __future__ import annotations

import gc

from . import controls
from .assembly import IGNORE, Example, _Plan
from .assembly import assemble as _assemble, assemble_respelling as _assemble_respelling  # noqa: F401 (tests)
from .assembly import regions as _regions, segments as _segments  # noqa: F401 (tests)
from .config import CONTROL_TOKENS, STREAMS, TRAIN_ON, TRUNCATION
from .errors import ChatmaskError, ConfigError, ConversationError
from .messages import check_rendered, normalize_messages, weights as _weights
from .spans import Renderer, Turn, answer_regions, content_spans, renderer, resolve_template
from .template_checks import check_template
from .tokens import Row, TextTokens, text_tokens
from .truncation import LENGTH_REASONS, truncate

__all__ = ["IGNORE", "LENGTH_REASONS", "Example", "apply_train_on", "check_template", "content_spans", "encode",
           "encode_many", "encode_turns", "normalize_messages", "renderer", "resolve_template", "truncate"]

# STREAMS (config.STREAMS), the token stream: `rendering`, the tokenizer's encoding of the whole rendered text (what
# `apply_chat_template(tokenize=True)` feeds the model), a token that straddles a prompt/answer boundary
# re-spelt as its two parts; or `segments`, each prompt and answer segment encoded as a text of its own, the
# way mistral-common (and mistral-finetune) encode a conversation: a SentencePiece tokenizer then gives each
# segment its dummy prefix.


def _check_choice(name: str, value, choices) -> None:
    """The one check of an option's spelling (config's: TRAIN_ON, TRUNCATION; STREAMS)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_options(train_on, truncation, stream="rendering", control_tokens="text") -> None:
    _check_choice("stream", stream, STREAMS)
    _check_choice("control_tokens", control_tokens, CONTROL_TOKENS)
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


def _find(render, msgs, text, tt, where, control_tokens):
    """controls.find; under --control-tokens parse a content whose control tokens cannot be told from the
    template's is encoded as apply_chat_template does all the same, its spans not reported."""
    try:
        return controls.find(render, msgs, text, tt, where)
    except ConversationError:
        if control_tokens == "parse":
            return []
        raise


def _plan_row(r: Renderer, messages, source, train_on, control_tokens="text", tt=None) -> _Plan:
    where = source or "conversation"
    msgs = normalize_messages(messages, source)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(f"{where}: no assistant turn", reason="no assistant turn")
    rendering = r.training_text(msgs, source=source)
    if check_rendered(msgs, rendering, where):
        r.warn_dropped_reasoning()
    turns = answer_regions(r, msgs, rendering, where)
    trained = _trained_turns(_weights(messages), turns, train_on, where)
    next_roles = [msgs[t.index + 1]["role"] if t.index + 1 < len(msgs) else None for t in turns]
    unstopped = frozenset(t.index for t, nxt in zip(turns, next_roles)
                          if t.index in trained and r.context(nxt) in r.unstopped)
    control = _find(lambda ms: r.training_text(ms, source=source), msgs, rendering, tt, where, control_tokens)
    if control and control_tokens == "refuse":
        raise controls.refuse(msgs, rendering, control, where)
    return _Plan(source, rendering, turns, trained, train_on, all(t.preserving for t in turns),
                 bool(r.append) and msgs[-1]["role"] == "assistant", unstopped, control, control_tokens == "text")


def _trained_turns(weights, turns: list[Turn], train_on, source) -> set[int]:
    """The answers the assistant labels train (weight 1); `apply_train_on` then makes the other arms."""
    if not turns:
        raise ConversationError(f"{source}: no assistant turn to train on", reason="no assistant turn")
    chosen = {t.index for t in turns if weights[t.index]}
    if not chosen and train_on != "all":
        raise ConversationError(f"{source}: every assistant turn has weight 0; nothing to train on",
                                reason="all weights 0")
    return chosen


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
    literal = _literal_spans(plans, texts, owner)  # text index -> control tokens to encode as plain text
    encs = tt.encode(texts)
    if tt.piecewise and plans and not _sampled_rows_agree(tt, texts, owner, encs, len(plans)):
        tt.piecewise = False  # a case the probe missed: encode whole texts from now on, for every row
        encs = tt.encode(texts)
    if literal:
        for j, row in zip(literal, controls.encode_rows(tt, [texts[j] for j in literal], list(literal.values()))):
            encs[j] = row
    if stream == "rendering":
        return encs
    rows, pos = [([], []) for _ in plans], [0] * len(plans)
    for k, text, (starts, runs) in zip(owner, texts, encs):
        rows[k][0].extend(s + pos[k] for s in starts)
        rows[k][1].extend(runs)
        pos[k] += len(text)
    return rows


def _literal_spans(plans: list[_Plan], texts, owner) -> dict[int, list[tuple[int, int]]]:
    """For each text holding control tokens to encode as plain text (--control-tokens text), their spans in it."""
    out, pos = {}, 0
    for j, (k, text) in enumerate(zip(owner, texts)):
        pos = 0 if j == 0 or owner[j - 1] != k else pos + len(texts[j - 1])  # where the text starts in its row
        if plans[k].literal and plans[k].control:
            spans = [(a - pos, b - pos) for a, b in plans[k].control if pos <= a < pos + len(text)]
            if spans:
                out[j] = spans
    return out


def _sampled_rows_agree(tt: TextTokens, texts, owner, encs, n_rows: int) -> bool:
    """Whether the piecewise encodings of the rows `due_for_check` picks equal their whole-text ones (before
    the control tokens of --control-tokens text are re-encoded as plain text, which controls.py checks)."""
    due = {k for k in range(n_rows) if tt.due_for_check()}
    picked = [j for j, k in enumerate(owner) if k in due]
    return not picked or tt.same_as_whole([texts[j] for j in picked], [encs[j] for j in picked])


def encode_many(rows, tokenizer, *, train_on="assistant", max_length=None, template=None, truncation="turns",
                end_of_turn=None, stream="rendering", stop_tokens=(), control_tokens="text"):
    """`encode` over many `(messages, source)` rows with one tokenizer call for all of them (the fast
    tokenizer's batch API uses every core). Returns, per row, an Example or the ChatmaskError that row
    raised."""
    _check_options(train_on, truncation, stream, control_tokens)
    tt = text_tokens(tokenizer)  # an unusable tokenizer is said before anything about its template
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    # a batch allocates many short-lived lists; the cyclic collector's passes over them (and over the
    # memo) would cost about a third of the time, and nothing here makes cycles
    gc_on = gc.isenabled()
    gc.disable()
    try:
        plans = []
        for messages, source in rows:
            try:
                plans.append(_plan_row(r, messages, source, train_on, control_tokens, tt))
            except ChatmaskError as e:
                plans.append(e)
        return _encode_plans(plans, r, tokenizer, max_length, truncation, stream)
    finally:
        if gc_on:
            gc.enable()


# ---------------------------------------------------------------- public


def encode(messages, tokenizer, *, train_on: str = "assistant", max_length: int | None = None,
           template: str | None = None, truncation: str = "turns", source: str = "", end_of_turn: str | None = None,
           stream: str = "rendering", stop_tokens=(), control_tokens: str = "text") -> Example:
    """Render `messages` with the chat template and label each assistant answer (its text after the
    generation prompt through the end-of-turn marker); everything else is -100. `input_ids` are the
    tokenizer's encoding of the whole rendering (see STREAMS for the one exception and the alternative);
    `end_of_turn` names the marker where the template leaves it ambiguous; `stop_tokens` are the model's
    own stop list (its generation_config.json `eos_token_id`, as strings: `hub.model_stop_tokens`), which
    the end of each turn is read with (README, "The stop"); `control_tokens` says how a control token that a
    message's content writes is encoded (controls.py: `text`, as plain text; `parse`; `refuse`).

    >>> ex = encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tok)
    >>> tok.decode([t for t in ex.labels if t != -100])
    'Hello!<|im_end|>'
    """
    out = encode_many([(messages, source)], tokenizer, train_on=train_on, max_length=max_length,
                      template=template, truncation=truncation, end_of_turn=end_of_turn, stream=stream,
                      stop_tokens=stop_tokens, control_tokens=control_tokens)[0]
    if isinstance(out, ChatmaskError):
        raise out
    return out


def encode_turns(messages, tokenizer, *, max_length: int | None = None, template: str | None = None,
                 source: str = "", end_of_turn: str | None = None, stream: str = "rendering",
                 stop_tokens=(), control_tokens: str = "text") -> list[Example]:
    """One example per trained assistant turn: prompt = that turn's generation prompt exactly as at
    inference, only that turn trained. The faithful form for templates that rewrite earlier turns."""
    _check_options("assistant", "turns", stream, control_tokens)
    tt = text_tokens(tokenizer)
    msgs = normalize_messages(messages, source)
    weights = _weights(messages)
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    where = source or "conversation"

    def turn_text(sub) -> tuple[str, int]:  # (the prompt as at inference + the turn's answer, the prompt's length)
        rendering = r.training_text(sub, source=source)
        if check_rendered(sub, rendering, where):
            r.warn_dropped_reasoning()
        turn = answer_regions(r, sub, rendering, where)[-1]
        prompt = r.render(sub[:-1], True, source=source) if not r.gen_prompt_empty else rendering[: turn.start]
        if rendering.startswith(prompt) and len(prompt) <= turn.start:
            return prompt + rendering[len(prompt) : turn.end], len(prompt)
        # the generation prompt differs from the rendered turn (e.g. it opens <think>): prompt as at inference,
        return prompt + rendering[turn.start : turn.end], len(prompt)  # then the turn's rendered answer

    plans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not weights[i]:
            continue
        text, n = turn_text(msgs[: i + 1])
        name = f"{source}#turn{i}" if source else f"turn{i}"
        control = _find(lambda ms: turn_text(ms)[0], msgs[: i + 1], text, tt, name, control_tokens)
        if control and control_tokens == "refuse":
            raise controls.refuse(msgs[: i + 1], text, control, name)
        plans.append(_Plan(name, text, [Turn(i, n, len(text), True)], {i}, "assistant", True, control=control,
                           literal=control_tokens == "text"))
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
