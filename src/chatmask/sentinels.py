"""A chat template rendered with sentinel contents: `render_sentinels(renderer, notes) -> Renderings`.

What the template writes after an answer in each context (followed by a user, tool, system or assistant
message, or last), in front of the first message, and after add_generation_prompt: what `markers.analyse`
reads each turn's end off. The sentinels are private-use characters: they never meet real text and are
never tokenized. Also the text searches markers and spans share (special tokens, common prefix, suffix).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

from .errors import TemplateError
from .messages import REASONING_FIELDS

S0, S1 = "\ue000", "\ue001"
TEXT_FIELDS = ("content",) + REASONING_FIELDS
"""The text fields of a message a template may render (besides tool calls)."""
CONTEXTS = ("user", "tool", "system", "assistant")
"""What may follow an answer (besides nothing: the `last` context)."""


def _sentinels(roles):
    return [{"role": role, "content": f"{S0}{index}{S1}"} for index, role in enumerate(roles)]


def first_special(specials, text: str, start: int = 0) -> tuple[int, int] | None:
    """(start, end) of the earliest added/special token in text[start:], longest at a tie."""
    best = None
    for token in specials:  # longest first
        at = text.find(token, start)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, at + len(token))
    return best


def last_special(specials, text: str) -> tuple[int, int] | None:
    best, at = None, 0
    while (found := first_special(specials, text, at)) is not None:
        best, at = found, found[1]
    return best


def span_text(text: str, span: tuple[int, int] | None) -> str | None:
    return text[span[0]:span[1]] if span is not None else None


def common_suffix(first: str, second: str) -> str:
    size = 0
    while size < min(len(first), len(second)) and first[-1 - size] == second[-1 - size]:
        size += 1
    return first[len(first) - size:]


def common_prefix_len(first: str, second: str) -> int:
    size = 0
    while size < min(len(first), len(second)) and first[size] == second[size]:
        size += 1
    return size


# ---------------------------------------------------------------- what the template renders


@dataclass
class Renderings:
    """The renderings `markers.analyse` reads: the probe's roles, what follows an answer per context, what
    precedes the first message, the assistant header after an answer."""

    base: tuple
    after: dict[str, str]  # context -> the text the template writes after an answer (its tail)
    first_header: str  # what precedes the first message's content
    gen_after_answer: str  # what add_generation_prompt adds after a conversation ending with an answer
    gen_prompt: str = ""  # what it adds after one ending with a user message
    gen_empty: bool = False
    gen_always: bool = False


def _base_roles(renderer, notes) -> tuple | None:
    for roles in (("user", "assistant"), ("system", "user", "assistant")):
        try:
            renderer.render(_sentinels(roles))
            return roles
        except TemplateError as err:
            notes.append(f"probe {'/'.join(roles)}: {err}")
    notes.append("no end-of-turn marker could be found: the template fails on a plain user/assistant conversation")
    return None


def _generation_prompt_kind(renderer, base, tag) -> tuple[bool, bool]:
    """(renders nothing, always there): a template that ignores add_generation_prompt and always ends with
    the assistant header ends a conversation that ends with an answer the same way; the text between
    that header and the content (Command-R's <|START_RESPONSE|>) is the model's to write."""
    before_answer = _sentinels(base[:-1])
    try:
        if renderer.render(before_answer, True) != renderer.render(before_answer, False):
            return False, False
        with_answer = renderer.render(_sentinels(base))
        header = common_suffix(renderer.render(before_answer), with_answer)
        up_to_answer = with_answer.split(tag, 1)[0]
        at = up_to_answer.rfind(header) if header.strip() else -1
        if at < 0:
            return True, False
        # the header also opens the answer, with at most special tokens between: it is always there
        between = up_to_answer[at + len(header):]
        for token in renderer.specials:
            between = between.replace(token, "")
        return True, not any(char.isalnum() for char in between)
    except TemplateError:
        return False, False


def _generation_prompt_after(renderer, roles) -> tuple[str, str]:
    """(the rendering of a conversation of `roles`, what add_generation_prompt adds after it); empty where
    the template raises."""
    try:
        plain, prompted = renderer.render(_sentinels(roles)), renderer.render(_sentinels(roles), True)
    except TemplateError:
        return "", ""
    return plain, prompted[len(plain):] if prompted.startswith(plain) else ""


def _tails(renderer, base, tag) -> dict[str, str]:
    """context -> what the template writes after the probe's answer when a `context` message follows it
    (followed in turn by an answer where the template needs one), or nothing follows (`last`)."""
    after = {}
    for ctx in CONTEXTS + ("last",):
        for roles in ((base + (ctx, "assistant"), base + (ctx,)) if ctx != "last" else (base,)):
            try:
                rendering = renderer.render(_sentinels(roles))
            except TemplateError:
                continue
            if rendering.count(tag) == 1:
                after[ctx] = rendering.split(tag, 1)[1].split(S0, 1)[0]
                break
    return after


def render_sentinels(renderer, notes) -> Renderings | None:
    base = _base_roles(renderer, notes)
    if base is None:
        return None
    tag = f"{S0}{len(base) - 1}{S1}"
    empty, always = _generation_prompt_kind(renderer, base, tag)
    with_answer, gen_after_answer = _generation_prompt_after(renderer, base)
    gen_prompt = _generation_prompt_after(renderer, base[:-1])[1]
    return Renderings(base, _tails(renderer, base, tag), with_answer.split(f"{S0}0{S1}", 1)[0], gen_after_answer,
                      gen_prompt, empty, always)


# ---------------------------------------------------------------- where one message lies in a rendering


def sentinel_message(message: dict, index: int) -> dict:
    """The message with each text a template may render from it (its text fields, its tool calls' arguments)
    replaced by a sentinel of its own, and its structure kept, so that the template takes the branch the
    message takes (a tool call's header and end, a reasoning channel). Tool names stay: a template may write
    them into the next message too (gpt-oss's tool header)."""
    tags = (f"{S0}{index}{S1}" if k == 0 else f"{S0}{index}:{k}{S1}" for k in itertools.count())
    out = dict(message)
    for key in TEXT_FIELDS:
        if isinstance(message.get(key), str) and message[key]:
            out[key] = next(tags)
    calls = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            return out
        inner = "function" in call and isinstance(call["function"], dict)
        function = dict(call["function"] if inner else call)
        args = {"x": next(tags)}
        function["arguments"] = json.dumps(args, ensure_ascii=False) if isinstance(
            function.get("arguments"), str) else args
        calls.append({**call, "function": function} if inner else function)
    if calls:
        out["tool_calls"] = calls
    return out


def diff_span(renderer, messages, rendering: str, index: int, source: str, structured: bool | None = None):
    """(start, end) of what message `index` renders in `rendering`: render again with the message replaced by
    a sentinel and take what differs. The sentinel is a plain message (structured=False), the message's own
    structure with sentinel texts (True), or plain unless the template refuses it (None)."""
    m = messages[index]
    if structured is None:
        try:
            return diff_span(renderer, messages, rendering, index, source, False)
        except TemplateError:
            if not set(m) - {"role", "content"}:
                raise
        structured = True
    alt = list(messages)
    alt[index] = sentinel_message(m, index) if structured else {"role": m["role"], "content": f"{S0}{index}{S1}"}
    R, A = rendering, renderer.training_text(alt, source=source)
    found = [(t.start(), t.end()) for t in re.finditer(f"{S0}{index}(?::\\d+)?{S1}", A)]
    if not found or len({A[a:b] for a, b in found}) < len(found):
        raise TemplateError(
            f"{source}, message {index + 1}: the template renders a {m['role']} message "
            f"{'more than once' if found else 'nowhere'}; chatmask cannot label it", reason="template error")
    p = common_prefix_len(R, A)
    q = min(len(common_suffix(R, A)), min(len(R), len(A)) - p)
    if not all(p <= a and b <= len(A) - q for a, b in found):
        raise TemplateError(f"{source}, message {index + 1}: cannot locate it in the rendering",
                            reason="template error")
    return p, len(R) - q
