"""Assistant-only labels for any chat template: `encode(messages, tokenizer) -> Example`.

The conversation is rendered once with the template; the answer region of each assistant turn (the text
after its generation prompt through the end-of-turn marker) is found from the template itself, by
rendering the same conversation *shape* with sentinel contents once and caching that skeleton, or, for
rows the skeleton does not explain, by rendering with sentinels row by row. The text is tokenized
segment by segment at those boundaries, `input_ids` and `labels` are built in the same loop, and every
trained run is decoded and compared with the text it must equal.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass, field

from .errors import ChatmaskError, ConfigError, ConversationError, TemplateError, short
from . import templates

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all", "last_assistant")
TRUNCATION = ("turns", "right", "drop")

# Private-use characters: a sentinel never meets real text and is never tokenized.
_S0, _S1 = "\ue000", "\ue001"
_PAD = " \n "  # around a sentinel, tells whether the template strips a message's content
_SENTINEL_RE = re.compile(_S0 + r"(\d+)" + _S1)
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


# ---------------------------------------------------------------- rendering


@dataclass
class _Skeleton:
    """What a template renders around the contents of one conversation shape (sentinel contents)."""

    pieces: list[tuple[str, int, bool, bool]]  # (template text before, message index, keeps left/right ws)
    tail: str
    piece_starts: list[int] = field(default_factory=list)  # where each piece (then the tail) starts in S
    head: dict[int, tuple[int, int] | None] = field(default_factory=dict)  # assistant -> (piece, offset) where its
    # answer starts (the end of its generation prompt), None: at its content
    marker: dict[int, int] = field(default_factory=dict)  # assistant index -> marker length after content
    preserving: dict[int, bool] = field(default_factory=dict)


class Renderer:
    """A compiled template bound to a tokenizer's special tokens, with its analysis and skeleton cache."""

    def __init__(self, template_text: str, tokenizer):
        from transformers.utils.chat_template_utils import _compile_jinja_template  # sandboxed, as transformers

        self.text = template_text
        try:
            self.compiled = _compile_jinja_template(template_text)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"chat template does not compile: {e}") from None
        self.kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        dec = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials |= {t.content for t in dec.values() if getattr(t, "special", False)}
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._skeletons: dict[tuple, _Skeleton | None] = {}
        self._srenders: dict[tuple, str | None] = {}
        self._seg_ids: dict[str, list[int]] = {}
        self._memo_chars = 0
        self.verified: set[str] = set()
        self.marker, self.gen_prompt_empty, self.notes = self._analyse()

    # -- tokenizing: a segment's tokens depend on its text alone, and prompts repeat across rows (the same
    # passage asked about several entity types, the same template text), so each distinct segment is
    # tokenized and verified once. Bounded: cleared when it holds _MEMO_CHARS of text.
    def tokenize(self, tokenizer, texts: list[str]) -> list[list[int]]:
        memo = self._seg_ids
        todo = [t for t in dict.fromkeys(texts) if t not in memo]
        if not todo:
            return [memo[t] for t in texts]
        memo.update(zip(todo, _encode_texts(tokenizer, todo)))
        out = [memo[t] for t in texts]
        self._memo_chars += sum(map(len, todo))
        if self._memo_chars > _MEMO_CHARS:
            memo.clear()
            self.verified.clear()
            self._memo_chars = 0
        return out

    def remember_verified(self, text: str) -> None:
        self.verified.add(text)

    # -- rendering
    def render(self, messages, add_generation_prompt=False, source="") -> str:
        try:
            return self.compiled.render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.kwargs,
            )
        except Exception as e:  # the template's raise_exception, SecurityError, UndefinedError, ...
            where = f"{source}: " if source else ""
            raise TemplateError(
                f"{where}the chat template raised {type(e).__name__}: {e}",
                reason="template error",
            ) from None

    # -- template-level analysis, done once
    def _probe(self, roles):
        msgs = [{"role": r, "content": f"{_S0}{j}{_S1}"} for j, r in enumerate(roles)]
        return msgs, self.render(msgs)

    def _analyse(self):
        notes = []
        marker = ""
        gen_empty = False
        probe = None
        for roles in (("user", "assistant", "user", "assistant"), ("system", "user", "assistant", "user", "assistant")):
            try:
                probe = (roles, self._probe(roles)[1], self._probe(roles[: roles.index("assistant") + 1])[1])
                break
            except TemplateError as e:
                notes.append(f"probe {'/'.join(roles)}: {e}")
        if probe is None:
            notes.append("no end-of-turn marker could be found: the template fails on a plain user/assistant conversation")
            return "", gen_empty, notes
        roles, full, short_ = probe
        a = roles.index("assistant")
        tag = f"{_S0}{a}{_S1}"
        if full.count(tag) == 1 and short_.count(tag) == 1:
            after_full = full.split(tag, 1)[1]
            after_full = after_full.split(_S0, 1)[0]
            after_short = short_.split(tag, 1)[1]
            cp = os.path.commonprefix([after_full, after_short])
            marker = _cut_marker(cp, self.specials)
        try:
            msgs = [{"role": r, "content": f"{_S0}{j}{_S1}"} for j, r in enumerate(roles[:a])]
            gen_empty = self.render(msgs, True) == self.render(msgs, False)
        except TemplateError:
            pass
        return marker, gen_empty, notes

    # -- per shape
    def skeleton(self, roles: tuple) -> _Skeleton | None:
        if roles in self._skeletons:
            return self._skeletons[roles]
        try:
            sk = self._build_skeleton(roles)
        except TemplateError:
            sk = None
        self._skeletons[roles] = sk
        return sk

    def _build_skeleton(self, roles) -> _Skeleton | None:
        S = self._sentinel_render(roles, False)
        if S is None:
            return None
        pieces, starts, pos, seen, region = [], [], 0, {}, {}
        for m in _SENTINEL_RE.finditer(S):
            j = int(m.group(1))
            if j >= len(roles):
                return None
            lkeep = S.startswith(_PAD, m.start() - len(_PAD)) and m.start() - len(_PAD) >= pos
            rkeep = S.startswith(_PAD, m.end())
            start = m.start() - len(_PAD) if lkeep else m.start()
            end = m.end() + len(_PAD) if rkeep else m.end()
            pieces.append((S[pos:start], j, lkeep, rkeep))
            starts.append(pos)
            seen[j] = seen.get(j, 0) + 1
            region[j] = (start, end)
            pos = end
        sk = _Skeleton(pieces, S[pos:], starts + [pos])
        for i, r in enumerate(roles):
            if r != "assistant":
                continue
            if seen.get(i) != 1:
                return None  # the template drops or repeats an answer: row-by-row path decides
            start, end = region[i]
            h, preserving = self._answer_start(self._sentinel_render(roles[:i], True), S, start)
            g = start - h  # end of the generation prompt in S: inside a template piece, or no fast path
            k = next((k for k, p0 in enumerate(sk.piece_starts) if p0 <= g and (k == len(pieces) or g <= p0 + len(pieces[k][0]))), None)
            if k is None:
                return None
            sk.head[i] = (k, g - sk.piece_starts[k]) if preserving else None
            sk.marker[i] = len(self.marker) if self.marker and S.startswith(self.marker, end) else 0
            if preserving:
                e = end + sk.marker[i]
                preserving = self._sentinel_render(roles[: i + 1], False).startswith(S[:e])
            sk.preserving[i] = preserving
        return sk

    def _sentinel_render(self, roles: tuple, gen: bool) -> str | None:
        """The rendering of a conversation of this shape with padded sentinel contents (memoized: shapes
        share prefixes, so each prefix is rendered once). None where the template raises."""
        key = (roles, gen)
        if key not in self._srenders:
            msgs = [{"role": r, "content": f"{_PAD}{_S0}{j}{_S1}{_PAD}"} for j, r in enumerate(roles)]
            try:
                self._srenders[key] = self.render(msgs, gen)
            except TemplateError:
                self._srenders[key] = None
        return self._srenders[key]

    def _generation_prompt(self, msgs, i, source=""):
        try:
            return self.render(msgs[:i], True, source=source)
        except TemplateError:
            return None

    def _answer_start(self, G, R, content_start) -> tuple[int, bool]:
        """Chars of template text between the end of a turn's generation prompt `G` and its content, and
        whether the generation prompt is a prefix of the rendering (else the answer starts at the content)."""
        if G is None:
            return 0, False
        if not (len(G) <= content_start and R.startswith(G)):
            return 0, False
        between = R[len(G) : content_start]
        if self.gen_prompt_empty and (any(c.isalnum() for c in between) or any(s in between for s in self.specials)):
            return 0, False  # no generation prompt: this is the assistant header, never trained
        return len(between), True


def _cut_marker(text: str, specials) -> str:
    """The end-of-turn marker from the template text common to every assistant turn's end: through the
    first special token if there is one, else that text without trailing whitespace."""
    best = None
    for s in specials:
        k = text.find(s)
        if k >= 0 and (best is None or k + len(s) < best):
            best = k + len(s)
    return text[:best] if best is not None else text.rstrip()


_renderers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resolve_template(tokenizer, template: str | None = None) -> str:
    """The Jinja text to render with: a built-in name, Jinja text, or the tokenizer's own template."""
    if template is None:
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):
            text = text.get("default")
        if not text:
            raise TemplateError(
                "the tokenizer has no chat template; pass template= (or --template) with a built-in name "
                f"({', '.join(sorted(templates.BUILTIN))}) or Jinja text",
                reason="no chat template",
            )
        return text
    if not isinstance(template, str):
        raise TemplateError(f"template must be a name or Jinja text, found {short(template)}")
    return template if templates.is_jinja(template) else templates.get(template).jinja


def renderer(tokenizer, template: str | None = None) -> Renderer:
    """The cached Renderer for (tokenizer, template)."""
    text = resolve_template(tokenizer, template)
    try:
        per_tok = _renderers.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        per_tok = {}
    key = (text, len(tokenizer))
    r = per_tok.get(key)
    if r is None:
        r = per_tok[key] = Renderer(text, tokenizer)
    return r


# ---------------------------------------------------------------- spans


@dataclass
class _Turn:
    index: int  # message index
    start: int  # answer region in the rendered text: [start, end)
    end: int
    preserving: bool


def _turns_fast(r: Renderer, msgs, R) -> list[_Turn] | None:
    """Answer regions from the cached skeleton of this shape; None if the row is not explained by it."""
    found = _match_skeleton(r, msgs, R)
    if found is None:
        return None
    sk, spans, starts = found
    return [
        _Turn(i, spans[i][0] if h is None else starts[h[0]] + h[1], spans[i][1] + sk.marker[i], sk.preserving[i])
        for i, h in sk.head.items()
    ]


def _match_skeleton(r: Renderer, msgs, R):
    """(skeleton, content span of each message, start of each template piece) when the row's rendering is
    exactly its shape's skeleton with the contents filled in; else None."""
    roles = []
    for m in msgs:
        if len(m) != 2 or "content" not in m:
            return None  # tool calls, names, reasoning: rendered from data, not from the shape
        roles.append(m["role"])
    sk = r.skeleton(tuple(roles))
    if sk is None:
        return None
    pos, spans, starts = 0, {}, []
    for piece, j, lkeep, rkeep in sk.pieces:
        if not R.startswith(piece, pos):
            return None
        starts.append(pos)
        pos += len(piece)
        c = msgs[j]["content"]
        if not lkeep:
            c = c.lstrip()
        if not rkeep:
            c = c.rstrip()
        if not R.startswith(c, pos):
            return None
        spans[j] = (pos, pos + len(c))
        pos += len(c)
    if len(R) - pos != len(sk.tail) or not R.startswith(sk.tail, pos):
        return None
    starts.append(pos)
    return sk, spans, starts


def _diff_span(r: Renderer, msgs, R, i, source) -> tuple[int, int]:
    """Where message i's content (and whatever the template renders from the rest of that message) lies in
    R: render with the message replaced by a plain sentinel message and take what differs."""
    tag = f"{_S0}{i}{_S1}"
    alt = list(msgs)
    alt[i] = {"role": msgs[i]["role"], "content": tag}
    A = r.render(alt, source=source)
    if A.count(tag) != 1:
        raise TemplateError(
            f"{source}: message {i}: the template renders a {msgs[i]['role']} message "
            f"{'more than once' if A.count(tag) > 1 else 'nowhere'}; chatmask cannot label it",
            reason="template error",
        )
    p = len(os.path.commonprefix([R, A]))
    limit = min(len(R), len(A)) - p
    q = 0
    while q < limit and R[-1 - q] == A[-1 - q]:
        q += 1
    k = A.index(tag)
    if not (p <= k and k + len(tag) <= len(A) - q):
        raise TemplateError(f"{source}: message {i}: cannot locate it in the rendering", reason="template error")
    return p, len(R) - q


def content_spans(messages, tokenizer, template=None, source="") -> tuple[str, dict[int, tuple[int, int]]]:
    """The rendering and the character span of each rendered message content in it (for audits: which
    role each token came from). Messages a template does not render have no span."""
    r = renderer(tokenizer, template)
    msgs = normalize_messages(messages, source)
    R = r.render(msgs, source=source)
    found = _match_skeleton(r, msgs, R)
    if found is not None:
        return R, found[1]
    spans = {}
    for i in range(len(msgs)):
        try:
            spans[i] = _diff_span(r, msgs, R, i, source or "conversation")
        except TemplateError:
            if msgs[i]["role"] == "assistant":
                raise
    return R, spans


def _turns_slow(r: Renderer, msgs, R, source) -> list[_Turn]:
    """Answer regions found turn by turn: render with that answer replaced by a sentinel and diff."""
    turns = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        cstart, cend = _diff_span(r, msgs, R, i, source)
        head, preserving = r._answer_start(r._generation_prompt(msgs, i, source), R, cstart)
        end = cend + (len(r.marker) if r.marker and R.startswith(r.marker, cend) else 0)
        if preserving:
            preserving = r.render(msgs[: i + 1], source=source).startswith(R[:end])
        turns.append(_Turn(i, cstart - head, end, preserving))
    return turns


def answer_regions(r: Renderer, msgs, R, source="") -> list[_Turn]:
    turns = _turns_fast(r, msgs, R)
    if turns is None:
        turns = _turns_slow(r, msgs, R, source)
    prev = 0
    for t in turns:
        if t.start < prev or t.end < t.start:
            raise TemplateError(
                f"{source}: message {t.index}: answer regions overlap; the template reorders turns",
                reason="template error",
            )
        prev = t.end
    return turns


# ---------------------------------------------------------------- tokenizing


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _decode_texts(tokenizer, ids: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(ids, skip_special_tokens=False)
    return [tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False) for x in ids]


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
    ids = r.tokenize(tokenizer, texts)
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
    checks = [c for c in checks if c[2] not in r.verified]
    decoded = _decode_texts(tokenizer, [c[1] for c in checks]) if checks else []
    for (row, _ids, want, i), got in zip(checks, decoded):
        if got == want:
            r.remember_verified(want)
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
