"""Assistant-only labels for any chat template: `encode(messages, tokenizer) -> Example`.

The conversation is rendered once with the template; the answer region of each assistant turn (the text
after its generation prompt through the end-of-turn marker) is found from the template itself, by
rendering the same conversation *shape* with sentinel contents once and caching that skeleton, or, for
rows the skeleton does not explain, by rendering with sentinels row by row. The text is tokenized
segment by segment at those boundaries, `input_ids` and `labels` are built in the same loop, and every
trained run is decoded and compared with the text it must equal.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from .errors import ChatmaskError, ConfigError, ConversationError, TemplateError, short
from .spans import Renderer, _Turn, _decode_texts, _encode_texts, answer_regions, content_spans, renderer, resolve_template

__all__ = ["IGNORE", "Example", "check_template", "content_spans", "encode", "encode_many", "encode_turns",
           "normalize_messages", "renderer", "resolve_template", "truncate"]

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all", "last_assistant")
TRUNCATION = ("turns", "right", "drop")

_MEMO_CHARS = 8_000_000  # text a Renderer keeps token ids for (~100 MB at most), then starts again


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

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


# ---------------------------------------------------------------- messages


def normalize_messages(messages, source: str = "") -> list[dict]:
    """Check the message shape and return plain dicts as templates expect them (content parts joined,
    `None` values and `weight` removed). Raises ConversationError naming the message."""
    where = f"{source}: " if source else ""
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(
            f"{where}messages must be a list of {{'role', 'content'}} dicts, found {short(messages)}",
            reason="messages not a list",
        )
    if not messages:
        raise ConversationError(f"{where}empty conversation", reason="empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(
                f"{where}message {i}: expected a dict with 'role' and 'content', found {short(m)}",
                reason="message not a dict",
            )
        role = m.get("role")
        if role not in ROLES:
            what = "no 'role'" if role is None else f"unknown role {short(role)}"
            raise ConversationError(
                f"{where}message {i}: {what}; expected one of {', '.join(ROLES)}",
                reason="missing role" if role is None else "unknown role",
            )
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for k, p in enumerate(content):
                if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                    parts.append(p["text"])
                else:
                    raise ConversationError(
                        f"{where}message {i}: content part {k} is not a text part, found {short(p)}; "
                        "only {'type': 'text', 'text': ...} parts can be trained on",
                        reason="non-text content",
                    )
            content = "".join(parts)
        elif content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise ConversationError(
                    f"{where}message {i} ({role}): content is missing or null", reason="null content"
                )
        elif not isinstance(content, str):
            raise ConversationError(
                f"{where}message {i} ({role}): content must be a string or a list of text parts, "
                f"found {type(content).__name__} {short(content)}",
                reason="bad content type",
            )
        w = m.get("weight", 1)
        if w not in (0, 1) or isinstance(w, float) and w not in (0.0, 1.0):
            raise ConversationError(
                f"{where}message {i}: weight must be 0 or 1, found {short(w)}", reason="bad weight"
            )
        d = {k: v for k, v in m.items() if v is not None and k != "weight"}
        if content is not None:
            d["content"] = content
        out.append(d)
    return out


def _weights(messages) -> list[int]:
    return [int(m.get("weight", 1)) if isinstance(m, dict) else 1 for m in messages]


# ---------------------------------------------------------------- tokenizing

_MEMO_CHARS = 4_000_000  # text whose token ids are kept per template (~50 MB at most), then started again
_MEMO_LONGEST = 4096  # longer segments are not kept


class _SegmentMemo:
    """A segment's tokens depend on its text alone, and prompts repeat across rows (the same passage asked
    about several entity types, the same template text), so each distinct segment is tokenized and
    verified once per (tokenizer, template). Bounded: cleared when it holds _MEMO_CHARS of text."""

    def __init__(self):
        self.ids: dict[str, list[int]] = {}
        self.verified: set[str] = set()
        self.chars = 0

    def tokenize(self, tokenizer, texts: list[str]) -> list[list[int]]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.ids]
        if not todo:
            return [self.ids[t] for t in texts]
        new = dict(zip(todo, _encode_texts(tokenizer, todo)))
        out = [self.ids.get(t) or new[t] for t in texts]
        # long segments (whole chat answers) hardly ever repeat: keeping them would only cost memory
        keep = {t: v for t, v in new.items() if len(t) <= _MEMO_LONGEST}
        self.ids.update(keep)
        self.chars += sum(map(len, keep))
        if self.chars > _MEMO_CHARS:
            self.ids.clear()
            self.verified.clear()
            self.chars = 0
        return out


_memos: "weakref.WeakKeyDictionary[Renderer, _SegmentMemo]" = weakref.WeakKeyDictionary()


def _memo(r: Renderer) -> _SegmentMemo:
    m = _memos.get(r)
    if m is None:
        m = _memos[r] = _SegmentMemo()
    return m



def _trained_turns(msgs, weights, turns: list[_Turn], train_on, source) -> set[int]:
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
    """A row rendered and cut at its answer boundaries, waiting for its segments' token ids."""

    source: str
    texts: list[str]  # non-empty segments of the rendering, in order
    turn: list[int | None]  # message index of each answer segment, None for the text between answers
    trained: set[int]
    train_on: str
    preserving: bool


def _plan(R, turns, trained, train_on, source) -> _Plan:
    texts, owner, pos = [], [], 0
    for t in turns:
        for a, b, who in ((pos, t.start, None), (t.start, t.end, t.index)):
            if b > a:
                texts.append(R[a:b])
                owner.append(who)
        pos = t.end
    if len(R) > pos:
        texts.append(R[pos:])
        owner.append(None)
    return _Plan(source, texts, owner, trained, train_on, all(t.preserving for t in turns))


def _assemble(plan: _Plan, ids: list[list[int]]):
    """input_ids and labels built in one loop; also the answer runs to verify and where turns end."""
    input_ids, labels, ends, checks = [], [], [], []
    for seg_ids, text, idx in zip(ids, plan.texts, plan.turn):
        input_ids += seg_ids
        train = plan.train_on == "all" or idx in plan.trained
        labels += seg_ids if train else [IGNORE] * len(seg_ids)
        if idx is not None:
            ends.append((len(input_ids), train))
            if idx in plan.trained:
                checks.append((seg_ids, text, idx))
    return Example(input_ids, labels, plan.source, plan.preserving), ends, checks


def encode_many(rows, tokenizer, *, train_on="assistant", max_length=None, template=None, truncation="turns"):
    """`encode` over many `(messages, source)` rows with one tokenizer call and one decode call for all
    of them (the fast-tokenizer batch APIs use every core). Returns, per row, an Example or the
    ChatmaskError that row raised."""
    _check_options(train_on, truncation)
    r = renderer(tokenizer, template)
    plans, texts = [], []
    for messages, source in rows:
        try:
            plan = _plan_row(r, messages, source, train_on)
        except ChatmaskError as e:
            plans.append(e)
            continue
        plans.append(plan)
        texts += plan.texts
    memo = _memo(r)
    ids = memo.tokenize(tokenizer, texts)
    out, checks, k = [], [], 0
    for plan in plans:
        if isinstance(plan, ChatmaskError):
            out.append(plan)
            continue
        n = len(plan.texts)
        ex, ends, chk = _assemble(plan, ids[k : k + n])
        k += n
        out.append((ex, ends))
        checks += [(len(out) - 1, *c) for c in chk]
    checks = [c for c in checks if c[2] not in memo.verified]
    decoded = _decode_texts(tokenizer, [c[1] for c in checks]) if checks else []
    for (row, _ids, want, i), got in zip(checks, decoded):
        if got == want:
            memo.verified.add(want)
        if got != want and not isinstance(out[row], ChatmaskError):
            src = out[row][0].source or "conversation"
            out[row] = TemplateError(
                f"{src}: message {i}: trained tokens decode to {short(got)} but the answer is {short(want)}; "
                "the tokenizer does not round-trip this text segment by segment",
                reason="decode mismatch",
            )
    for j, item in enumerate(out):
        if isinstance(item, tuple):
            ex, ends = item
            try:
                if max_length is not None and len(ex.input_ids) > max_length:
                    ex = truncate(ex, max_length, truncation, ends)
                out[j] = ex
            except ChatmaskError as e:
                out[j] = e
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
    return _plan(R, turns, trained, train_on, source)


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
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not weights[i]:
            continue
        sub = msgs[: i + 1]
        R = r.render(sub, source=source)
        turn = answer_regions(r, sub, R, where)[-1]
        G = r.render(msgs[:i], True, source=source) if not r.gen_prompt_empty else R[: turn.start]
        answer = R[turn.start : turn.end]
        if not R.startswith(G) or len(G) > turn.start:
            # generation prompt differs from the rendered turn (e.g. it opens <think>): prompt as at
            # inference, then the turn's rendered answer
            answer = R[turn.start : turn.end]
        else:
            answer = R[len(G) : turn.end]
        p_ids, a_ids = _encode_texts(tokenizer, [G, answer])
        if _decode_texts(tokenizer, [a_ids])[0] != answer:
            raise TemplateError(f"{where}: message {i}: trained tokens do not decode to the answer", reason="decode mismatch")
        ex = Example(p_ids + a_ids, [IGNORE] * len(p_ids) + a_ids, f"{source}#turn{i}" if source else f"turn{i}")
        if max_length is not None and len(ex.input_ids) > max_length:
            ex = truncate(ex, max_length, "turns", [(len(ex.input_ids), True)])
        out.append(ex)
    if not out:
        raise ConversationError(f"{where}: no assistant turn to train on", reason="no assistant turn")
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
                f"{len(_encode_texts(tokenizer, [stripped])[0])} ordinary tokens: add it "
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
    from . import spans

    spans._renderers.clear()
    _memos.clear()
