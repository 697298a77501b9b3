"""What ends an assistant turn: `analyse(renderer) -> Analysis`, each context's trained end of turn (its
*stop*), read off renderings of the template with sentinel contents (`sentinels.render_sentinels`: an
answer followed by a user, tool, system or assistant message, or last); and where a turn's trained text
starts (`answer_start`). Each rule is a function of its own.

The rule (README, "The stop"): the trained run after an answer ends with the first *stop* the template
writes after it: the template's end-of-turn token, the tokenizer's eos, or a token of the model's own
stop list (generation_config.json), even where that token opens the next message (GLM's `<|user|>`).
Without one, it ends where the next message's header begins, never a character of it. Headers are read
from renderings (what precedes a conversation's first message), not guessed from special tokens alone.
Where the template writes nothing after the last answer, the stop is appended (`Analysis.append`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TemplateError
from .sentinels import (Renderings, common_prefix_len, common_suffix, first_special, last_special, render_sentinels,
                        span_text)


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


# ---------------------------------------------------------------- the rules


def _heads(specials, first_header: str, texts) -> list[str]:
    """Where a header may begin in what precedes the first message: its start, and after each leading
    special token that only opens a conversation (bos, GLM's [gMASK]<sop>: none of `texts` holds it)."""
    heads, at = [first_header], 0
    while (special := first_special(specials, first_header, at)) is not None and special[0] == at:
        if any(span_text(first_header, special) in text for text in texts):
            break
        at = special[1]
        heads.append(first_header[at:])
    return heads


def header_cut(specials, after: dict, first_header: str, gen_prompt: str = "") -> int | None:
    """Where, in the text a template writes between an answer and the next message's content, that
    message's header begins (the same place whatever the next role: the end of a turn does not depend on
    it). With two or more contexts: the first cut of their common prefix after which the rest begins a
    header as the first message's does ('<|im_start|>' in front of 'user' and 'system' alike), else as the
    generation prompt's does, else the end of that prefix. With one: the cut after which the text reads
    most like the first message's header. None when no cut shares a visible character with it."""
    tails = [tail for ctx, tail in after.items() if ctx != "last"]
    heads = _heads(specials, first_header, tails)
    if len(tails) >= 2:
        shared = tails[0][: min(common_prefix_len(tails[0], tail) for tail in tails[1:])]
        for candidates in (heads, _heads(specials, gen_prompt, tails) if gen_prompt else []):
            cut = next((cut for cut in range(len(shared))
                        if any(head.startswith(shared[cut:]) for head in candidates)), None)
            if cut is not None:
                return cut
        return len(shared)
    return _most_header_like_cut(tails[0], heads) if tails else None


def _most_header_like_cut(tail: str, heads) -> int | None:
    """The cut of one context's tail after which it shares the longest visible start with a header (a tie
    goes to the later cut: the header is the shortest match at the end)."""
    best, best_len = None, 0
    for cut in range(len(tail) + 1):
        shared = max(common_prefix_len(tail[cut:], head) for head in heads)
        if shared >= best_len and shared >= 2 and tail[cut:cut + shared].strip():
            best, best_len = cut, shared
    return best


def _first_stop(stops, text: str, limit: int) -> tuple[int, int] | None:
    """(start, end) of the earliest stop in text that starts at or before `limit`, longest at a tie."""
    best = None
    for stop in sorted(stops, key=len, reverse=True):
        at = text.find(stop)
        if 0 <= at <= limit and (best is None or at < best[0]):
            best = (at, at + len(stop))
    return best


def with_eos(renderer, tail: str, end: int) -> str:
    """tail[:end], and the eos token if the template writes it right after (Command-R: <|END_RESPONSE|> then
    <|END_OF_TURN_TOKEN|>): the model must write it too, or it never learns to stop."""
    eos = _eos(renderer)
    if eos and tail.startswith(eos, end) and not tail[:end].endswith(eos):
        end += len(eos)
    return tail[:end]


def _eos(renderer) -> str:
    eos = renderer.kwargs.get("eos_token")
    eos = getattr(eos, "content", eos)
    return eos if isinstance(eos, str) else ""


def _end_of_turn_token(renderer, after: dict, heads: dict) -> str | None:
    """The template's own end-of-turn token: the first special token after every answer (followed by
    anything), before the next header where that is known."""
    found = set()
    for ctx, tail in after.items():
        if ctx == "last":
            continue
        special = first_special(renderer.specials, tail)
        if special is None or (heads.get(ctx) is not None and special[0] >= heads[ctx]):
            return None
        found.add(span_text(tail, special))
    return found.pop() if len(found) == 1 else None


def _context_marker(renderer, tail: str, header_at: int | None, stops, notes, ctx) -> tuple[str, bool] | None:
    """(trained end of turn, whether it holds a stop) after an answer followed by a `ctx` message, or None
    when the rules need the fallback (no header found and no stop)."""
    stop = _first_stop(stops, tail, len(tail) if header_at is None else header_at)
    if stop is not None:
        return with_eos(renderer, tail, stop[1]), True
    if header_at is None:
        return None
    marker = tail[:header_at].rstrip()
    if marker.strip():
        return marker, True
    special = first_special(renderer.specials, tail, header_at)
    if special is not None and special[0] == header_at:  # the header opens with a token of its own: GLM's <|user|>
        notes.append(f"no end-of-turn token before a {ctx} message: its header's first token "
                     f"{tail[header_at:special[1]]!r} is trained as the stop (pass --stop-tokens with the model's "
                     "stop list to choose)")
        return tail[:special[1]], True
    return marker, False


def _shared_token_markers(renderer, renders: Renderings, markers: dict, todo: list[str]) -> None:
    """The first fallback: where every undecided context's tail holds the same first special token, and no
    header holds it, that token ends the turn; an answer followed by an answer ends where the generation
    prompt begins."""
    specials, gen_after = renderer.specials, renders.gen_after_answer
    header_tokens = {span_text(gen_after, first_special(specials, gen_after)),
                     span_text(renders.first_header, last_special(specials, renders.first_header))} - {None}
    opening = {ctx: span_text(renders.after[ctx], first_special(specials, renders.after[ctx])) for ctx in todo}
    for ctx in todo:
        tail = renders.after[ctx]
        special = first_special(specials, tail)
        token = span_text(tail, special)
        if special is not None and all(other == token for other in opening.values()) and token not in header_tokens:
            markers[ctx] = with_eos(renderer, tail, special[1])
        elif ctx == "assistant" and gen_after.strip() and gen_after in tail:
            markers[ctx] = tail[: tail.index(gen_after)].rstrip()


def _fallback_markers(renderer, renders: Renderings, markers: dict, guessed: list) -> None:
    """The contexts no header told apart: a special token all contexts share, the generation prompt, or
    the header in front of the first message (a guess, checked against the last turn in `analyse`)."""
    todo = [ctx for ctx in renders.after if ctx != "last" and ctx not in markers]
    _shared_token_markers(renderer, renders, markers, todo)
    plain = markers.get("assistant")
    for ctx in sorted(todo, key=lambda context: context != "user"):  # the user context first: the others follow it
        if ctx in markers:
            continue
        tail = renders.after[ctx]
        reference = plain if plain is not None else markers.get("user")
        if reference is not None and tail.startswith(reference):
            markers[ctx] = reference
        else:  # the next header taken as what precedes the first message too: checked in `_last`
            markers[ctx] = tail[: len(tail) - len(common_suffix(tail, renders.first_header))].rstrip()
            guessed.append(ctx)


def _last(renderer, after: dict, markers: dict, stops, guessed) -> tuple[str, str]:
    """(trained end of the last answer, text to append after the rendering)."""
    tail = after["last"]
    reference = markers.get("user") or markers.get("assistant") or next(filter(None, markers.values()), "")
    for ctx in guessed:  # a guess is not a marker: it must end the last answer as well
        marker = markers[ctx]
        if (marker and not tail.startswith(marker)) or (not marker and tail.strip()):
            raise TemplateError(
                f"the end-of-turn marker is ambiguous: after an answer followed by a {ctx} message the "
                f"template writes {after[ctx]!r}, after the last answer {tail!r}, and no special token marks "
                "where the turn ends; add the template's tokens to the tokenizer "
                "(chatmask.add_template_tokens) or name the marker (end_of_turn=..., --end-of-turn)",
                reason="ambiguous end of turn")
    if reference and tail.startswith(reference):
        return reference, ""
    stop = _first_stop(stops, tail, len(tail))
    if stop is not None:
        return with_eos(renderer, tail, stop[1]), ""
    special = first_special(renderer.specials, tail)
    if special is not None:
        return with_eos(renderer, tail, special[1]), ""
    if tail.strip():
        return tail.rstrip(), ""
    # the template writes no end after the last answer: the stop is added
    appended = reference.lstrip() if reference else _eos(renderer)
    return tail + appended, appended


def _named(renderer, renders: Renderings) -> tuple[dict, str]:
    """The markers when the user names the end of turn: it ends every answer it follows."""
    named = renderer.end_of_turn
    mismatched = [ctx for ctx, tail in renders.after.items() if ctx != "last" and not tail.startswith(named)]
    if mismatched or not renders.after:
        raise TemplateError(
            f"end_of_turn {named!r} does not follow the answers this template renders "
            f"(followed by: {', '.join(repr(renders.after[ctx][:30]) for ctx in mismatched)})",
            reason="template error")
    out = {ctx: named for ctx in renders.after if ctx != "last"}
    appended = ""
    if "last" in renders.after:
        tail = renders.after["last"]
        special = first_special(renderer.specials, tail)
        if tail.startswith(named):
            out["last"] = named
        elif special:
            out["last"] = tail[: special[1]]
        elif tail.strip():
            out["last"] = tail.rstrip()
        else:
            out["last"], appended = tail + named, named
    return out, appended


def _found_markers(renderer, renders: Renderings, cut: int | None, model_stops, notes) -> tuple[dict, str, set]:
    """(markers, text appended after a last answer, contexts without a stop) by the rules: a stop before
    the next header (which begins `cut` characters after an answer), the text before it, then the
    fallbacks; the last answer checked against them."""
    heads = {ctx: cut for ctx in renders.after if ctx != "last"}
    end_token = _end_of_turn_token(renderer, renders.after, heads) if cut is None else None  # a header settles it
    stops = model_stops + ([end_token] if end_token else [])
    markers, unstopped, guessed = {}, set(), []
    for ctx, header_at in heads.items():
        found = _context_marker(renderer, renders.after[ctx], header_at, stops, notes, ctx)
        if found is not None:
            markers[ctx] = found[0]
            if not found[1]:
                unstopped.add(ctx)
    _fallback_markers(renderer, renders, markers, guessed)
    unstopped |= {ctx for ctx, marker in markers.items() if not marker.strip()}
    appended = ""
    if "last" in renders.after:
        markers["last"], appended = _last(renderer, renders.after, markers, stops, guessed)
        if not markers["last"].strip():
            unstopped.add("last")
    return markers, appended, unstopped


def analyse(renderer) -> Analysis:
    """The ends of turn of a Renderer's template (see the module's docstring); a marker no rule settles
    is a TemplateError naming the fix."""
    notes: list[str] = []
    renders = render_sentinels(renderer, notes)
    if renders is None:
        return Analysis({}, notes=tuple(notes))
    cut = header_cut(renderer.specials, renders.after, renders.first_header, renders.gen_prompt)
    headers = {ctx: tail[cut:] for ctx, tail in renders.after.items() if ctx != "last"} if cut is not None else {}
    model_stops = [stop for stop in (_eos(renderer), *renderer.stop_tokens) if stop]
    if renderer.end_of_turn is not None:
        markers, appended = _named(renderer, renders)
        unstopped = set()
    else:
        markers, appended, unstopped = _found_markers(renderer, renders, cut, model_stops, notes)
    ends = [_stop_of(marker, model_stops, renderer.specials) for marker in markers.values() if marker.strip()]
    return Analysis(markers, appended, tuple(dict.fromkeys(ends + model_stops)), headers, frozenset(unstopped),
                    renders.gen_empty, renders.gen_always, tuple(notes))


def _stop_of(marker: str, model_stops, specials) -> str:
    """The stop a trained end of turn ends with: a model stop or special token it ends with, else the
    marker itself (plain text)."""
    stripped = marker.strip()
    for stop in sorted(model_stops, key=len, reverse=True):
        if stripped.endswith(stop):
            return stop
    return next((token for token in specials if stripped.endswith(token)), stripped)


# ---------------------------------------------------------------- where an answer starts


def answer_start(r, G, R, content_start, before=None, floor=None) -> tuple[int, bool]:
    """Chars of template text between the end of a turn's generation prompt `G` and its content, and
    whether the generation prompt is a prefix of the rendering. `before()`: the rendering G prompts after;
    `floor()`: where the message before this answer ends in R (the head never reaches into it)."""
    if G is None:
        return 0, False
    if not (len(G) <= content_start and R.startswith(G)):
        b = before() if before and floor else None
        opening = G[len(b):] if b is not None and G.startswith(b) else ""
        return _reopened(r, opening, G, R, content_start, floor() if opening.strip() else 0), False
    between = R[len(G) : content_start]
    if r.gen_prompt_empty and not r.gen_always and (
            any(c.isalnum() for c in between) or any(s in between for s in r.specials)):
        return 0, False  # no generation prompt: this is the assistant header, never trained
    return len(between), True


def _reopened(r, opening: str, G: str, R: str, content_start: int, floor: int) -> int:
    """The head of a turn whose generation prompt is not a prefix of the rendering: the text after the
    last `opening` (what the generation prompt adds; else its longest part up to a special token or a line
    end, where the rendering opens this turn with less: Nemotron's `<think>` left out before a tool call)
    before the content, where it opens this turn (no end of a turn between: gpt-oss's
    `<|channel|>final<|message|>` after a tool result, its call's analysis dropped from the rendering but not
    from the prompt), found after `floor` (the message before ends there), else `_align_head`'s."""
    cuts = {len(opening)} | {i + 1 for i, c in enumerate(opening) if c == "\n"}
    cuts |= {opening.find(s) + len(s) for s in r.specials if s in opening}
    for cut in sorted(cuts, reverse=True):
        at = R.rfind(opening[:cut], floor, content_start) if opening[:cut].strip() else -1
        gap = R[at + cut : content_start]
        if at >= 0 and len(gap) <= 200 and not any(m.strip() and m.strip() in gap for m in r.markers.values()):
            return len(gap)
    return _align_head(r, G, R, content_start)


def _align_head(r, G: str, R: str, content_start: int) -> int:
    """For a turn whose generation prompt is not a prefix of the rendering (the template rewrites earlier
    text): the template text between the end of the assistant header and the content, found as the
    whitespace or punctuation run before the content after which the rendering ends most like `G`."""
    best, best_n = 0, 0
    for b in range(min(content_start, 16) + 1):
        gap = R[content_start - b : content_start]
        if any(c.isalnum() for c in gap) or any(s in gap for s in r.specials):
            break
        n = len(common_suffix(G[-200:], R[max(0, content_start - b - 200) : content_start - b]))
        if n > best_n:
            best, best_n = b, n
    return best
