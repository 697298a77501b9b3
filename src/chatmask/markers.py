"""What ends an assistant turn: `analyse(renderer) -> Analysis`, each context's trained end of turn (its
*stop*), read off renderings of the template with sentinel contents (an answer followed by a user, tool,
system or assistant message, or last).

The rule (README, "The stop"): the trained run after an answer ends with the first *stop* the template
writes after it: the template's end-of-turn token, the tokenizer's eos, or a token of the model's own
stop list (generation_config.json), even where that token opens the next message (GLM's `<|user|>`).
Without one, it ends where the next message's header begins, never a character of it. Headers are read
from renderings (what precedes a conversation's first message), not guessed from special tokens alone.
Where the template writes nothing after the last answer, the stop is appended (`Analysis.append`).
The sentinels are private-use characters: they never meet real text and are never tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TemplateError

S0, S1 = "\ue000", "\ue001"
CONTEXTS = ("user", "tool", "system", "assistant")
"""What may follow an answer (besides nothing: the `last` context)."""


@dataclass(frozen=True)
class Analysis:
    """A template's ends of turn, as `analyse` finds them."""

    markers: dict[str, str]
    """context ('user', 'tool', 'system', 'assistant', 'last') -> the text after an answer that is trained"""
    append: str = ""
    """appended after a conversation that ends with an answer: the stop the template does not write there"""
    stops: tuple[str, ...] = ()
    """what the trained ends of turn end with, and the eos: the strings generation must stop on"""
    headers: dict[str, str] = field(default_factory=dict)
    """context -> the next message's header as rendered (what a model that does not stop runs into)"""
    unstopped: frozenset = frozenset()
    """contexts whose trained end of turn holds no stop: answers there do not teach the model to stop"""
    gen_empty: bool = False
    """add_generation_prompt renders nothing"""
    gen_always: bool = False
    """the template always ends with the assistant header (Command-R): the answer starts after it"""
    notes: tuple[str, ...] = ()


def _sentinels(roles):
    return [{"role": role, "content": f"{S0}{j}{S1}"} for j, role in enumerate(roles)]


def first_special(specials, text: str, start: int = 0) -> tuple[int, int] | None:
    """(start, end) of the earliest added/special token in text[start:], longest at a tie."""
    best = None
    for s in specials:  # longest first
        k = text.find(s, start)
        if k >= 0 and (best is None or k < best[0]):
            best = (k, k + len(s))
    return best


def last_special(specials, text: str) -> tuple[int, int] | None:
    best, k = None, 0
    while (f := first_special(specials, text, k)) is not None:
        best, k = f, f[1]
    return best


def common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- what the template renders


@dataclass
class _Renders:
    """The renderings `analyse` reads: the probe's roles, what follows an answer per context, what
    precedes the first message, the assistant header after an answer."""

    base: tuple
    after: dict[str, str]
    first_header: str  # what precedes the first message's content
    gen_after_answer: str  # what add_generation_prompt adds after a conversation ending with an answer
    gen_prompt: str = ""  # what it adds after one ending with a user message
    gen_empty: bool = False
    gen_always: bool = False


def _base_roles(r, notes) -> tuple | None:
    for roles in (("user", "assistant"), ("system", "user", "assistant")):
        try:
            r.render(_sentinels(roles))
            return roles
        except TemplateError as e:
            notes.append(f"probe {'/'.join(roles)}: {e}")
    notes.append("no end-of-turn marker could be found: the template fails on a plain user/assistant conversation")
    return None


def _generation_prompt_kind(r, base, tag) -> tuple[bool, bool]:
    """(renders nothing, always there): a template that ignores add_generation_prompt and always ends with
    the assistant header ends a conversation that ends with an answer the same way; the text between
    that header and the content (Command-R's <|START_RESPONSE|>) is the model's to write."""
    a = len(base) - 1
    try:
        empty = r.render(_sentinels(base[:a]), True) == r.render(_sentinels(base[:a]), False)
        if not empty:
            return False, False
        T = common_suffix(r.render(_sentinels(base[:a])), r.render(_sentinels(base)))
        pre = r.render(_sentinels(base)).split(tag, 1)[0]
        k = pre.rfind(T) if T.strip() else -1
        if k < 0:
            return True, False
        between = pre[k + len(T):]  # T also opens the answer, with at most special tokens between: a header
        for s in r.specials:
            between = between.replace(s, "")
        return True, not any(c.isalnum() for c in between)
    except TemplateError:
        return False, False


def _renders(r, notes) -> _Renders | None:
    base = _base_roles(r, notes)
    if base is None:
        return None
    tag = f"{S0}{len(base) - 1}{S1}"
    empty, always = _generation_prompt_kind(r, base, tag)
    try:
        Rb, Gb = r.render(_sentinels(base)), r.render(_sentinels(base), True)
        g = Gb[len(Rb):] if Gb.startswith(Rb) else ""
    except TemplateError:
        Rb, g = "", ""
    try:
        Ru, Gu = r.render(_sentinels(base[:-1])), r.render(_sentinels(base[:-1]), True)
        gu = Gu[len(Ru):] if Gu.startswith(Ru) else ""
    except TemplateError:
        gu = ""
    after = {}
    for ctx in CONTEXTS + ("last",):
        for roles in ((base + (ctx, "assistant"), base + (ctx,)) if ctx != "last" else (base,)):
            try:
                R = r.render(_sentinels(roles))
            except TemplateError:
                continue
            if R.count(tag) == 1:
                after[ctx] = R.split(tag, 1)[1].split(S0, 1)[0]
                break
    return _Renders(base, after, Rb.split(f"{S0}0{S1}", 1)[0], g, gu, empty, always)


# ---------------------------------------------------------------- the rules


def _heads(specials, first_header: str, texts) -> list[str]:
    """Where a header may begin in what precedes the first message: its start, and after each leading
    special token that only opens a conversation (bos, GLM's [gMASK]<sop>: none of `texts` holds it)."""
    heads, k = [first_header], 0
    while (f := first_special(specials, first_header, k)) is not None and f[0] == k:
        if any(first_header[f[0]:f[1]] in t for t in texts):
            break
        k = f[1]
        heads.append(first_header[k:])
    return heads


def header_cut(specials, after: dict, first_header: str, gen_prompt: str = "") -> int | None:
    """Where, in the text a template writes between an answer and the next message's content, that
    message's header begins (the same place whatever the next role: the end of a turn does not depend on
    it). With two or more contexts: the first cut of their common prefix after which the rest begins a
    header as the first message's does ('<|im_start|>' in front of 'user' and 'system' alike), else as the
    generation prompt's does, else the end of that prefix. With one: the cut after which the text reads
    most like the first message's header. None when no cut shares a visible character with it."""
    texts = [A for c, A in after.items() if c != "last"]
    heads = _heads(specials, first_header, texts)
    if len(texts) >= 2:
        P = texts[0][: min(_common_prefix_len(texts[0], t) for t in texts[1:])]
        for hs in (heads, _heads(specials, gen_prompt, texts) if gen_prompt else []):
            k = next((k for k in range(len(P)) if any(h.startswith(P[k:]) for h in hs)), None)
            if k is not None:
                return k
        return len(P)
    if not texts:
        return None
    text, best, best_n = texts[0], None, 0
    for cut in range(len(text) + 1):
        n = max(_common_prefix_len(text[cut:], h) for h in heads)
        if n >= best_n and n >= 2 and text[cut:cut + n].strip():
            best, best_n = cut, n  # a tie goes to the later cut: the header is the shortest match at the end
    return best


def _first_stop(stops, text: str, limit: int) -> tuple[int, int] | None:
    """(start, end) of the earliest stop in text that starts at or before `limit`, longest at a tie."""
    best = None
    for s in sorted(stops, key=len, reverse=True):
        k = text.find(s)
        if 0 <= k <= limit and (best is None or k < best[0]):
            best = (k, k + len(s))
    return best


def with_eos(r, A: str, k: int) -> str:
    """A[:k], and the eos token if the template writes it right after (Command-R: <|END_RESPONSE|> then
    <|END_OF_TURN_TOKEN|>): the model must write it too, or it never learns to stop."""
    eos = _eos(r)
    if eos and A.startswith(eos, k) and not A[:k].endswith(eos):
        k += len(eos)
    return A[:k]


def _eos(r) -> str:
    eos = r.kwargs.get("eos_token")
    eos = getattr(eos, "content", eos)
    return eos if isinstance(eos, str) else ""


def _end_of_turn_token(r, after: dict, heads: dict) -> str | None:
    """The template's own end-of-turn token: the first special token after every answer (followed by
    anything), before the next header where that is known."""
    found = set()
    for ctx, A in after.items():
        if ctx == "last":
            continue
        f = first_special(r.specials, A)
        if f is None or (heads.get(ctx) is not None and f[0] >= heads[ctx]):
            return None
        found.add(A[f[0]:f[1]])
    return found.pop() if len(found) == 1 else None


def _context_marker(r, A: str, h: int | None, stops, notes, ctx) -> tuple[str, bool] | None:
    """(trained end of turn, whether it holds a stop) after an answer followed by a `ctx` message, or None
    when the rules need the fallback (no header found and no stop)."""
    s = _first_stop(stops, A, len(A) if h is None else h)
    if s is not None:
        return with_eos(r, A, s[1]), True
    if h is None:
        return None
    m = A[:h].rstrip()
    if m.strip():
        return m, True
    f = first_special(r.specials, A, h)
    if f is not None and f[0] == h:  # the header opens with a token of its own (GLM's <|user|>): the stop
        notes.append(f"no end-of-turn token before a {ctx} message: its header's first token {A[h:f[1]]!r} is "
                     "trained as the stop (pass --stop-tokens with the model's stop list to choose)")
        return A[:f[1]], True
    return m, False


def _fallback_markers(r, rd: _Renders, markers: dict, guessed: list) -> None:
    """The contexts no header told apart: a special token all contexts share, the generation prompt, or
    the header in front of the first message (a guess, checked against the last turn in `analyse`)."""
    g, x0 = rd.gen_after_answer, rd.first_header
    first = lambda t: (lambda f: t[f[0]:f[1]] if f else None)(first_special(r.specials, t))  # noqa: E731
    header_tokens = {first(g), (lambda f: x0[f[0]:f[1]] if f else None)(last_special(r.specials, x0))} - {None}
    todo = [c for c in rd.after if c != "last" and c not in markers]
    inner = {c: first(rd.after[c]) for c in todo}
    for ctx in todo:
        A = rd.after[ctx]
        f = first_special(r.specials, A)
        if f is not None and all(v == A[f[0]:f[1]] for v in inner.values()) and A[f[0]:f[1]] not in header_tokens:
            markers[ctx] = with_eos(r, A, f[1])
        elif ctx == "assistant" and g.strip() and g in A:
            markers[ctx] = A[: A.index(g)].rstrip()
    plain = markers.get("assistant")
    for ctx in sorted(todo, key=lambda c: c != "user"):  # the user context first: the others follow it
        if ctx in markers:
            continue
        A = rd.after[ctx]
        ref = plain if plain is not None else markers.get("user")
        if ref is not None and A.startswith(ref):
            markers[ctx] = ref
        else:  # the next header taken as what precedes the first message too: checked in `_last`
            markers[ctx] = A[: len(A) - len(common_suffix(A, x0))].rstrip()
            guessed.append(ctx)


def _last(r, after: dict, markers: dict, stops, guessed) -> tuple[str, str]:
    """(trained end of the last answer, text to append after the rendering)."""
    A = after["last"]
    ref = markers.get("user") or markers.get("assistant") or next((m for m in markers.values() if m), "")
    for ctx in guessed:  # a guess is not a marker: it must end the last answer as well
        m = markers[ctx]
        if (m and not A.startswith(m)) or (not m and A.strip()):
            raise TemplateError(
                f"the end-of-turn marker is ambiguous: after an answer followed by a {ctx} message the "
                f"template writes {after[ctx]!r}, after the last answer {A!r}, and no special token marks "
                "where the turn ends; add the template's tokens to the tokenizer "
                "(chatmask.add_template_tokens) or name the marker (end_of_turn=..., --end-of-turn)",
                reason="ambiguous end of turn")
    if ref and A.startswith(ref):
        return ref, ""
    s = _first_stop(stops, A, len(A))
    if s is not None:
        return with_eos(r, A, s[1]), ""
    f = first_special(r.specials, A)
    if f is not None:
        return with_eos(r, A, f[1]), ""
    if A.strip():
        return A.rstrip(), ""
    app = ref.lstrip() if ref else _eos(r)  # the template writes no end after the last answer: the stop is added
    return A + app, app


def _named(r, rd: _Renders) -> tuple[dict, str]:
    """The markers when the user names the end of turn: it ends every answer it follows."""
    m = r.end_of_turn
    bad = [c for c, A in rd.after.items() if c != "last" and not A.startswith(m)]
    if bad or not rd.after:
        raise TemplateError(
            f"end_of_turn {m!r} does not follow the answers this template renders "
            f"(followed by: {', '.join(repr(rd.after[c][:30]) for c in bad)})", reason="template error")
    out = {c: m for c in rd.after if c != "last"}
    app = ""
    if "last" in rd.after:
        A = rd.after["last"]
        f = first_special(r.specials, A)
        if A.startswith(m):
            out["last"] = m
        elif f:
            out["last"] = A[: f[1]]
        elif A.strip():
            out["last"] = A.rstrip()
        else:
            out["last"], app = A + m, m
    return out, app


def analyse(r) -> Analysis:
    """The ends of turn of a Renderer's template (see the module's docstring); a marker no rule settles
    is a TemplateError naming the fix."""
    notes: list[str] = []
    rd = _renders(r, notes)
    if rd is None:
        return Analysis({}, notes=tuple(notes))
    cut = header_cut(r.specials, rd.after, rd.first_header, rd.gen_prompt)
    heads = {c: cut for c in rd.after if c != "last"}
    headers = {c: rd.after[c][h:] for c, h in heads.items() if h is not None}
    model_stops = [s for s in (_eos(r), *r.stop_tokens) if s]
    if r.end_of_turn is not None:
        markers, app = _named(r, rd)
        unstopped = set()
    else:
        eot = _end_of_turn_token(r, rd.after, heads) if cut is None else None  # a known header settles it
        stops = model_stops + ([eot] if eot else [])
        markers, unstopped, guessed = {}, set(), []
        for ctx, h in heads.items():
            got = _context_marker(r, rd.after[ctx], h, stops, notes, ctx)
            if got is not None:
                markers[ctx] = got[0]
                if not got[1]:
                    unstopped.add(ctx)
        _fallback_markers(r, rd, markers, guessed)
        unstopped |= {c for c, m in markers.items() if not m.strip()}
        app = ""
        if "last" in rd.after:
            markers["last"], app = _last(r, rd.after, markers, stops, guessed)
            if not markers["last"].strip():
                unstopped.add("last")
    ends = [_stop_of(m, model_stops, r.specials) for m in markers.values() if m.strip()]
    return Analysis(markers, app, tuple(dict.fromkeys(ends + model_stops)), headers, frozenset(unstopped),
                    rd.gen_empty, rd.gen_always, tuple(notes))


def _stop_of(marker: str, model_stops, specials) -> str:
    """The stop a trained end of turn ends with: a model stop or special token it ends with, else the
    marker itself (plain text)."""
    m = marker.strip()
    for s in sorted(model_stops, key=len, reverse=True):
        if m.endswith(s):
            return s
    return next((s for s in specials if m.endswith(s)), m)
