"""Render a conversation with its chat template and find each assistant answer's span in the text
(what ends each turn, and where its trained text starts, is `markers.py`'s).

The spans come from the template itself: a conversation *shape* (its roles) is rendered once with
sentinel contents and the skeleton cached (`Renderer.skeleton`); a row whose rendering is exactly its
skeleton with the contents filled in is located by string comparison alone, any other row by rendering
it with one message at a time replaced by a sentinel and diffing (`answer_regions`; a tool call whose plain
stand-in the template refuses or ends otherwise keeps its structure, `sentinels.sentinel_message`). Templates are
rendered in transformers' immutable Jinja sandbox, exactly as `apply_chat_template` renders them.
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass, field

from . import templates
from .errors import ChatmaskWarning, TemplateError, short
from .markers import analyse, answer_start
from .messages import normalize_messages
from .sentinels import S0, S1, diff_span

_PAD = " \n "  # around a sentinel, tells whether the template strips a message's content
_SENTINEL_RE = re.compile(S0 + r"(\d+)" + S1)


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

    def __init__(self, template_text: str, tokenizer, end_of_turn: str | None = None, stop_tokens=()):
        from transformers.utils.chat_template_utils import _compile_jinja_template  # sandboxed, as transformers

        self.text = template_text
        try:
            self.compiled = _compile_jinja_template(template_text)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"chat template does not compile: {e}") from None
        self.kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        dec = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        if callable(dec):  # a method on some backends (transformers' MistralCommonBackend)
            dec = {}
        specials |= {t.content for t in dec.values() if getattr(t, "content", None)}  # added tokens are atomic
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._skeletons: dict[tuple, _Skeleton | None] = {}
        self._srenders: dict[tuple, str | None] = {}
        self.end_of_turn = end_of_turn
        self.stop_tokens = tuple(s for s in stop_tokens if s)
        self.analysis = a = analyse(self)
        self.markers, self.gen_prompt_empty, self.gen_always, self.notes = a.markers, a.gen_empty, a.gen_always, \
            list(a.notes)
        self.append, self.stops, self.headers, self.unstopped = a.append, a.stops, a.headers, a.unstopped
        # the marker after an answer followed by a user message (else the last one): what `check` shows
        self.marker = self.markers.get("user", self.markers.get("last", ""))
        self.warned = self.warned_reasoning = False

    def context(self, next_role: str | None) -> str:
        """The context of an answer followed by a `next_role` message (None: the last message), as `markers`
        names it."""
        m = self.markers
        ctx = next_role or "last"
        return ctx if ctx in m else "user" if "user" in m else "last"

    def marker_for(self, next_role: str | None) -> str:
        """The end-of-turn marker of an answer followed by a `next_role` message (None: the last message)."""
        return self.markers.get(self.context(next_role), "")

    def warn_once(self) -> None:
        """Say once, at labelling time, what `check_template` finds that makes the labels less than exact."""
        if self.warned:
            return
        self.warned = True
        import warnings

        for n in self.notes:
            warnings.warn(f"chat template: {n}", ChatmaskWarning, stacklevel=3)
        odd = sorted({m.strip() for m in self.markers.values() if m.strip() and m.strip() not in self.specials})
        if odd:
            warnings.warn(
                f"chat template: end-of-turn marker {' / '.join(map(repr, odd))} is not a token of this tokenizer, "
                "so it is trained as ordinary tokens that may merge with the text around it; add it "
                "(chatmask.add_template_tokens) or use the model's own template", ChatmaskWarning, stacklevel=3)
        if not any(self.markers.values()):
            warnings.warn("chat template: no end-of-turn marker follows the answers, so the model is not taught "
                          "to stop", ChatmaskWarning, stacklevel=3)
        elif self.unstopped:
            where = ", ".join("after the last answer" if c == "last" else f"before a {c} message"
                              for c in sorted(self.unstopped))
            warnings.warn(f"chat template: no stop ends an answer {where}: such answers are trained without one "
                          "(counted in rows_without_trained_stop); pass --stop-tokens with the model's stop list, or "
                          "add the template's tokens (chatmask.add_template_tokens)", ChatmaskWarning, stacklevel=3)

    def warn_dropped_reasoning(self) -> None:
        """Say once that the template strips the <think> block from the last answer too."""
        if not self.warned_reasoning:
            self.warned_reasoning = True
            import warnings

            warnings.warn("chat template: it drops the <think> block of the last answer too (DeepSeek-R1's does), "
                          "so no answer's reasoning is trained, only what follows </think>; to train the reasoning, "
                          "pass a template that keeps the last answer's (--template)", ChatmaskWarning, stacklevel=4)

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

    def training_text(self, messages, source="") -> str:
        """The rendering a conversation is trained on: the template's, and the stop it does not write after
        a last answer (`append`), which the model writes at inference."""
        R = self.render(messages, source=source)
        if self.append and messages and messages[-1]["role"] == "assistant":
            R += self.append
        return R

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
            h, preserving = answer_start(self, self._sentinel_render(roles[:i], True), S, start)
            g = start - h  # end of the generation prompt in S: inside a template piece, or no fast path
            k = next((k for k, p0 in enumerate(sk.piece_starts)
                      if p0 <= g and (k == len(pieces) or g <= p0 + len(pieces[k][0]))), None)
            if k is None:
                return None
            sk.head[i] = (k, g - sk.piece_starts[k])
            m = self.marker_for(roles[i + 1] if i + 1 < len(roles) else None)
            if not S.startswith(m, end):
                return None  # the row-by-row path says why
            sk.marker[i] = len(m)
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
            msgs = [{"role": r, "content": f"{_PAD}{S0}{j}{S1}{_PAD}"} for j, r in enumerate(roles)]
            try:
                self._srenders[key] = self.render(msgs, gen) if gen else self.training_text(msgs)
            except TemplateError:
                self._srenders[key] = None
        return self._srenders[key]

    def _generation_prompt(self, msgs, i, source="", prompted=True):
        """The rendering of msgs[:i], with the generation prompt (or without); None where the template raises."""
        try:
            return self.render(msgs[:i], prompted, source=source)
        except TemplateError:
            return None


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


def renderer(tokenizer, template: str | None = None, end_of_turn: str | None = None, stop_tokens=()) -> Renderer:
    """The cached Renderer for (tokenizer, template, end_of_turn, the model's stop tokens)."""
    text = resolve_template(tokenizer, template)
    try:
        per_tok = _renderers.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        per_tok = {}
    stop_tokens = tuple(stop_tokens or ())
    key = (text, len(tokenizer), end_of_turn, stop_tokens)
    r = per_tok.get(key)
    if r is None:
        r = per_tok[key] = Renderer(text, tokenizer, end_of_turn, stop_tokens)
    return r


# ---------------------------------------------------------------- spans


@dataclass
class Turn:
    index: int  # message index
    start: int  # answer region in the rendered text: [start, end)
    end: int
    preserving: bool


def _turns_fast(r: Renderer, msgs, R) -> list[Turn] | None:
    """Answer regions from the cached skeleton of this shape; None if the row is not explained by it."""
    found = _match_skeleton(r, msgs, R)
    if found is None:
        return None
    sk, spans, starts = found
    return [
        Turn(i, spans[i][0] if h is None else starts[h[0]] + h[1], spans[i][1] + sk.marker[i], sk.preserving[i])
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


def content_spans(messages, tokenizer, template=None, source="", stop_tokens=(),
                  end_of_turn=None) -> tuple[str, dict[int, tuple[int, int]]]:
    """The training text and the character span of each rendered message content in it (for audits: which
    role each token came from). Messages a template does not render have no span."""
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    msgs = normalize_messages(messages, source)
    R = r.training_text(msgs, source=source)
    found = _match_skeleton(r, msgs, R)
    if found is not None:
        return R, found[1]
    spans = {}
    for i in range(len(msgs)):
        try:
            spans[i] = diff_span(r, msgs, R, i, source or "conversation")
        except TemplateError:
            if msgs[i]["role"] == "assistant":
                raise
    return R, spans


def _turns_slow(r: Renderer, msgs, R, source) -> list[Turn]:
    """Answer regions found turn by turn: render with that answer replaced by a sentinel and diff (each
    message's span diffed once a row: `span`)."""
    turns = []
    span = functools.cache(lambda j, structured=None: diff_span(r, msgs, R, j, source, structured))
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        cstart, end = _answer_span(r, msgs, R, i, source, span)
        G = r._generation_prompt(msgs, i, source)
        head, preserving = answer_start(r, G, R, cstart, lambda: r._generation_prompt(msgs, i, source, False),
                                        lambda: _end_of(span, i - 1, cstart))
        if preserving:
            preserving = r.training_text(msgs[: i + 1], source=source).startswith(R[:end])
        turns.append(Turn(i, cstart - head, end, preserving))
    return turns


def _end_of(span, j, unknown: int) -> int:
    """Where message j's text ends (0 before the first message; `unknown` where it cannot be located)."""
    try:
        return span(j)[1] if j >= 0 else 0
    except TemplateError:
        return unknown


def _answer_span(r: Renderer, msgs, R, i, source, span) -> tuple[int, int]:
    """(start of answer i's text, end of its turn): the plain sentinel's span and the end-of-turn marker after
    it; for a message with more than a content (a tool call) whose plain stand-in the template refuses or ends
    otherwise, the structured sentinel's span and the first marker or stop after it, before the next message."""
    marker, plain = r.marker_for(msgs[i + 1]["role"] if i + 1 < len(msgs) else None), len(R)
    try:
        plain, cend = span(i, False)
        if R.startswith(marker, cend):
            return plain, cend + len(marker)
        error = TemplateError(
            f"{source}, message {i + 1}: the end-of-turn marker {marker!r} does not follow this answer (found "
            f"{short(R[cend:cend + len(marker) + 10])}); the template ends this turn unlike the others",
            reason="template error")
    except TemplateError as e:
        error = e
    if not set(msgs[i]) - {"role", "content"}:
        raise error
    try:
        cstart, cend = span(i, True)
        bound = span(i + 1)[0] if i + 1 < len(msgs) else len(R)
        if plain < cstart and plain >= _end_of(span, i - 1, len(R)):
            cstart = plain  # the call's text starts where the plain stand-in's does (DSML's tag, not its arguments)
    except TemplateError:
        raise error from None
    ends = [(at, at + len(s)) for s in {marker, *r.stop_tokens} if s and (at := R.find(s, cend, bound)) >= 0]
    if not ends:
        raise error
    return cstart, min(ends)[1]


def answer_regions(r: Renderer, msgs, R, source="") -> list[Turn]:
    turns = _turns_fast(r, msgs, R)
    if turns is None:
        turns = _turns_slow(r, msgs, R, source)
    prev = 0
    for t in turns:
        if t.start < prev or t.end < t.start:
            raise TemplateError(
                f"{source}, message {t.index + 1}: answer regions overlap; the template reorders turns",
                reason="template error",
            )
        prev = t.end
    return turns
