"""Control tokens written inside a message's content: found in each row, then encoded by the policy.

A control token is an added token the tokenizer marks special, the ones transformers' `split_special_tokens`
acts on (`<|im_end|>`, `[INST]`, `<|eot_id|>`, `<start_of_turn>`); the other added tokens (Qwen's `<think>`,
`<tool_call>`) are words the model writes and stay as the tokenizer encodes them. `find` gives where in a
rendering the content, not the template, spells one; `encode_rows` encodes renderings with those characters
as plain text, as mistral-common and Meta's ChatFormat encode content (policy `text`, the default); `parse`
keeps apply_chat_template's tokens (scraped text can then forge a turn boundary); `refuse` drops the row.
`token_ranges` says which tokens of a row spell such text (Example.control_text; `view` marks them).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
import weakref

from .errors import ConversationError, TemplateError, short
from .tokens import Row, Run, TextTokens, ids_of

REFUSED = "control token in content"  # the reason such rows are dropped under --control-tokens refuse
_ANCHOR = "\ue000chatmask-anchor\ue001"  # an added token of the copy that encodes content as text
_FILL = "\ue002"  # stands in for a control token's characters in the content, to tell them from the template's


@functools.lru_cache(maxsize=64)
def _pattern(contents: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, sorted(contents, key=len, reverse=True)))) if contents else None


def pattern(tt: TextTokens) -> re.Pattern | None:
    """A regex matching the tokenizer's control tokens (longest first, as the tokenizer matches them); kept on
    the token view, since every row asks for it."""
    rx = getattr(tt, "_control_re", False)
    if rx is False:
        rx = tt._control_re = _pattern(tuple(c for c, a in tt.added.items() if a["special"]))
    return rx


def _strings(x):
    """Every string a message holds but its role (content, reasoning, tool-call arguments, names)."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            if k != "role":
                yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _filled(x, rx: re.Pattern):
    """A message with each control token in its strings replaced by as many _FILL characters."""
    if isinstance(x, str):
        return rx.sub(lambda m: _FILL * len(m.group()), x)
    if isinstance(x, dict):
        return {k: v if k == "role" else _filled(v, rx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_filled(v, rx) for v in x]
    return x


def find(render, msgs, R: str, tt: TextTokens, where: str) -> list[tuple[int, int]]:
    """The character spans of `R`, the text `render(msgs)` gives, where a message's content spells a control
    token: the control tokens of R that are gone when the contents have those characters filled in."""
    rx = pattern(tt)
    if rx is None or not any(rx.search(s) for m in msgs for s in _strings(m)):
        return []
    F = render([_filled(m, rx) for m in msgs])
    if len(F) != len(R):
        raise ConversationError(
            f"{where}: a message's content spells a control token and the template renders that content so that "
            "chatmask cannot tell it from the template's own tokens; remove it, or pass --control-tokens parse",
            reason=REFUSED)
    return [m.span() for m in rx.finditer(R) if F[m.start():m.end()] != m.group()]


def refuse(msgs, R: str, spans, where: str) -> ConversationError:
    """The error of a row `--control-tokens refuse` keeps out: the first message and token, in context."""
    a, b = spans[0]
    rx = _pattern((R[a:b],))
    found = next(((k, m) for k, msg in enumerate(msgs) for s in _strings(msg) for m in [rx.search(s)] if m), None)
    at = f", message {found[0] + 1}" if found else ""
    seen = f" in {short(found[1].string[max(0, found[1].start() - 20):found[1].end() + 20])}" if found else ""
    return ConversationError(
        f"{where}{at}: its content writes the control token {R[a:b]!r}{seen} ({len(spans)} in the row), which "
        "--control-tokens refuse keeps out; --control-tokens text (the default) encodes it as plain text",
        reason=REFUSED)


# ---------------------------------------------------------------- encoding content as text

_literal: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _backend(tt: TextTokens):
    """A copy of the tokenizer that encodes special tokens as text, with a plain added token to place a
    piece after (as TextTokens places its pieces after its anchor), checked on probes: None if it differs
    from the tokenizer on text without control tokens."""
    if tt in _literal:
        return _literal[tt]
    from tokenizers import AddedToken, Tokenizer

    copy = Tokenizer.from_str(tt.backend.to_str())
    copy.add_tokens([AddedToken(_ANCHOR, special=False, normalized=False)])
    copy.encode_special_tokens = True
    probes = ["Hi there", " x\n", "\n\nYes.", "a\n b  ", "word", "Hello  world\n\n\tend"]
    toks = list(tt.added)[:8]
    probes = [f"{p}{c}{q}" for c in toks for p, q in zip(probes, probes[1:])] + probes
    got = _split_runs(tt, copy, probes, [[]] * len(probes))
    ok = got is not None and [ids_of(x) for x in got] == tt.whole_ids(probes)
    _literal[tt] = copy if ok else None
    return _literal[tt]


def _split_runs(tt: TextTokens, copy, texts, spans_of) -> list[Row] | None:
    """Each text cut at its added tokens but those starting a span of `spans_of`, the pieces between encoded by
    `copy` (a piece that does not start the text after the anchor, so that it gets the dummy prefix it gets
    in the whole text)."""
    split = tt._split_re
    if split is None:
        return None
    rows, todo = [], []
    for text, spans in zip(texts, spans_of):
        literal = {a for a, _ in spans}
        starts, runs, pos = [], [], 0
        for m in split.finditer(text):
            core, off = tt._core(m.group())
            at = m.start() + off
            if at in literal and tt.added[core]["special"]:
                continue  # spelt by the content: encoded with the text around it
            starts += [pos, at]
            runs += [text[pos:m.start()], tt._atomic[core]]
            pos = m.end()
        starts.append(pos)
        runs.append(text[pos:])
        for k in range(0, len(runs), 2):
            todo.append((runs, k, starts[k] == 0))
        rows.append((starts, runs))
    inputs = [runs[k] if first else _ANCHOR + runs[k] for runs, k, first in todo]
    for (runs, k, first), enc in zip(todo, copy.encode_batch(inputs, add_special_tokens=False)):
        if not runs[k]:
            runs[k] = Run([], offs=[])
        elif first:
            runs[k] = Run(enc.ids, enc)
        else:
            runs[k] = Run(enc.ids[1:], enc, 1, len(_ANCHOR))
    return rows


def encode_rows(tt: TextTokens, texts: list[str], spans_of: list[list[tuple[int, int]]]) -> list[Row]:
    """Rows of `texts` whose characters in `spans_of` (control tokens the content spells) are encoded as plain
    text, everything else as the tokenizer encodes the whole text."""
    copy = _backend(tt)
    if copy is None:
        raise TemplateError("this tokenizer's added tokens cannot be kept apart from the text around them, so "
                            "control-token text in content cannot be encoded as plain text; pass --control-tokens "
                            "parse or refuse", reason="tokenizer")
    return _split_runs(tt, copy, texts, spans_of)


def token_ranges(row: Row, spans) -> list[tuple[int, int]]:
    """[first, last + 1) token indices of `row` (the concatenation of its runs) that overlap each span."""
    starts, runs = row
    firsts, ends = [], []  # each token's first and end character
    for s, run in zip(starts, runs):
        for j in range(len(run.ids)):
            a, b = run.span(s, j)
            firsts.append(a)
            ends.append(b)
    ends = list(itertools.accumulate(ends, max))  # non-decreasing, for bisect
    return [(bisect.bisect_right(ends, a), bisect.bisect_left(firsts, b)) for a, b in spans]
