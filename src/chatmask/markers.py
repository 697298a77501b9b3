"""What ends an assistant turn: `analyse(renderer)` renders a template's alternatives (an answer followed by
a user, tool, system or assistant message, or last) with sentinel contents and finds each context's
end-of-turn marker, whether the generation prompt renders anything (or is always there), and notes.

The sentinels are private-use characters: they never meet real text and are never tokenized.
"""

from __future__ import annotations

from .errors import TemplateError

S0, S1 = "\ue000", "\ue001"


def _probe(r, roles):
    msgs = [{"role": role, "content": f"{S0}{j}{S1}"} for j, role in enumerate(roles)]
    return msgs, r.render(msgs)


def first_special(specials, text: str, start: int = 0) -> tuple[int, int] | None:
    """(start, end) of the earliest added/special token in text[start:], longest at a tie."""
    best = None
    for s in specials:  # longest first
        k = text.find(s, start)
        if k >= 0 and (best is None or k < best[0]):
            best = (k, k + len(s))
    return best


def analyse(r):
    """(markers, gen_empty, gen_always, notes) of a Renderer's template. The end-of-turn marker after an
    answer in each context (followed by a user, tool, system or
    assistant message, or last): the text the template writes after the answer up to the next
    message's header. Where that is a special token, through the first one that does not open the next
    header; else up to the assistant header (the generation prompt, known exactly) or, where the
    template allows no answer after an answer, the header found in front of the first message and
    checked against the last turn's ending. A marker no rule settles is a TemplateError."""
    notes, gen_empty, gen_always, base = [], False, False, None
    for roles in (("user", "assistant"), ("system", "user", "assistant")):
        try:
            _probe(r, roles)
            base = roles
            break
        except TemplateError as e:
            notes.append(f"probe {'/'.join(roles)}: {e}")
    if base is None:
        notes.append("no end-of-turn marker could be found: the template fails on a plain user/assistant conversation")
        return {}, gen_empty, gen_always, notes
    a = len(base) - 1
    tag = f"{S0}{a}{S1}"
    sent = lambda roles: [{"role": r, "content": f"{S0}{j}{S1}"} for j, r in enumerate(roles)]  # noqa: E731
    try:
        gen_empty = r.render(sent(base[:a]), True) == r.render(sent(base[:a]), False)
        # a template that ignores add_generation_prompt and always ends with the assistant header (it
        # ends a conversation that ends with an answer the same way): the header is there, the text
        # between it and the content (Command-R's <|START_RESPONSE|>) is the model's to write
        if gen_empty:
            T = common_suffix(r.render(sent(base[:a])), r.render(sent(base)))
            pre = r.render(sent(base)).split(tag, 1)[0]
            k = pre.rfind(T) if T.strip() else -1
            if k >= 0:  # T also opens the answer, with at most special tokens between: a header
                between = pre[k + len(T):]
                for s in r.specials:
                    between = between.replace(s, "")
                gen_always = not any(c.isalnum() for c in between)
    except TemplateError:
        pass
    g = ""  # the assistant header after an answer: the generation prompt of a conversation ending with one
    try:
        Rb, Gb = r.render(sent(base)), r.render(sent(base), True)
        g = Gb[len(Rb):] if Gb.startswith(Rb) else ""
    except TemplateError:
        Rb = ""
    x0 = Rb.split(f"{S0}0{S1}", 1)[0]  # what precedes the first message's content
    after = {}
    for ctx in ("user", "tool", "system", "assistant", "last"):
        for roles in ((base + (ctx, "assistant"), base + (ctx,)) if ctx != "last" else (base,)):
            try:
                R = r.render(sent(roles))
            except TemplateError:
                continue
            if R.count(tag) == 1:
                after[ctx] = R.split(tag, 1)[1].split(S0, 1)[0]
                break
    if r.end_of_turn is not None:  # named by the user: it ends every answer it follows
        m = r.end_of_turn
        bad = [c for c, A in after.items() if c != "last" and not A.startswith(m)]
        if bad or not after:
            raise TemplateError(
                f"end_of_turn {m!r} does not follow the answers this template renders "
                f"(followed by: {', '.join(repr(after[c][:30]) for c in bad)})", reason="template error")
        out = {c: m for c in after if c != "last"}
        if "last" in after:
            A = after["last"]
            f = first_special(r.specials, A)
            out["last"] = m if A.startswith(m) else A[: f[1]] if f else A.rstrip()
        return out, gen_empty, gen_always, notes

    def first(text):
        f = first_special(r.specials, text)
        return text[f[0]:f[1]] if f else None

    header_tokens = {first(g), (lambda f: x0[f[0]:f[1]] if f else None)(last_special(r.specials, x0))} - {None}
    inner = {c: first(A) for c, A in after.items() if c != "last"}
    markers, guessed = {}, []
    for ctx, A in after.items():
        if ctx == "last":
            continue
        f = first_special(r.specials, A)
        if f is not None and all(v == A[f[0]:f[1]] for v in inner.values()) and A[f[0]:f[1]] not in header_tokens:
            markers[ctx] = with_eos(r, A, f[1])
        elif ctx == "assistant" and g.strip() and g in A:
            markers[ctx] = A[: A.index(g)].rstrip()
    plain = markers.get("assistant")
    for ctx in sorted(after, key=lambda c: c != "user"):  # the user context first: the others follow it
        A = after[ctx]
        if ctx == "last" or ctx in markers:
            continue
        ref = plain if plain is not None else markers.get("user")
        if ref is not None and A.startswith(ref):
            markers[ctx] = ref
        else:  # the next header taken as what precedes the first message too: checked below
            markers[ctx] = A[: len(A) - len(common_suffix(A, x0))].rstrip()
            guessed.append(ctx)
    if "last" in after:
        A = after["last"]
        ref = markers.get("user") or markers.get("assistant") or next((m for m in markers.values() if m), "")
        f = first_special(r.specials, A)
        markers["last"] = ref if ref and A.startswith(ref) else with_eos(r, A, f[1]) if f else A.rstrip()
        for ctx in guessed:  # a guess is not a marker: it must end the last answer as well
            m = markers[ctx]
            if (m and not A.startswith(m)) or (not m and A.strip()):
                raise TemplateError(
                    f"the end-of-turn marker is ambiguous: after an answer followed by a {ctx} message the "
                    f"template writes {after[ctx]!r}, after the last answer {A!r}, and no special token marks "
                    "where the turn ends; add the template's tokens to the tokenizer "
                    "(chatmask.add_template_tokens) or name the marker (end_of_turn=..., --end-of-turn)",
                    reason="ambiguous end of turn")
    return markers, gen_empty, gen_always, notes


def with_eos(r, A: str, k: int) -> str:
    """A[:k], and the eos token if the template writes it right after (Command-R: <|END_RESPONSE|> then
    <|END_OF_TURN_TOKEN|>): the model must write it too, or it never learns to stop."""
    eos = r.kwargs.get("eos_token")
    eos = getattr(eos, "content", eos)
    if isinstance(eos, str) and eos and A.startswith(eos, k) and not A[:k].endswith(eos):
        k += len(eos)
    return A[:k]


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
