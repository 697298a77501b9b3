"""What a chat template means for training: `check_template(tokenizer, template) -> [notes]`.

Probes the template on a few conversation shapes and reads its analysis (`markers.analyse`, through the
`Renderer`): a missing or plain-text end of turn, stops it leaves out, a generation prompt that renders
nothing, templates that raise or rewrite earlier turns. `chatmask check` prints these notes; labelling
warns with the same ones once (`Renderer.warn_once`).
"""

from __future__ import annotations

from .errors import TemplateError
from .spans import Renderer, answer_regions, renderer
from .tokens import text_tokens

PROBES = {
    "user/assistant x2": ["user", "assistant", "user", "assistant"],
    "system first": ["system", "user", "assistant", "user", "assistant"],
    "tool message": ["user", "assistant", "tool", "assistant"],
}
"""The conversation shapes every template is tried on."""


def check_template(tokenizer, template: str | None = None, end_of_turn: str | None = None, stop_tokens=()) -> list[str]:
    """Problems and notes about how a template can be trained, e.g. `not prefix-preserving: ...`.
    An empty list means: prefix-preserving, with an end-of-turn marker that is trained."""
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    notes = list(r.notes) + _marker_notes(r, tokenizer) + _stop_notes(r) + _generation_prompt_notes(r)
    for name, roles in PROBES.items():
        notes += _probe_notes(r, name, roles)
    if any(tag in r.text for tag in ("{% generation %}", "{%- generation %}", "{% generation -%}")):
        notes.append("has {% generation %} tags: chatmask does not need them (labels come from the rendering)")
    return notes


def _marker_notes(r: Renderer, tokenizer) -> list[str]:
    """The end-of-turn marker: missing, plain text rather than a token, or a token that is not the eos."""
    if not r.marker:
        return ["no end-of-turn marker: nothing follows each answer, so only the content is trained and the model "
                "is not taught to stop"]
    eos = getattr(tokenizer, "eos_token", None)
    stripped = r.marker.strip()
    if stripped and stripped not in r.specials:
        return [f"end-of-turn marker {r.marker!r} is not a special token of this tokenizer, so it is trained as "
                f"{len(text_tokens(tokenizer).whole_ids([stripped])[0])} ordinary tokens: add it "
                "(chatmask.add_template_tokens) or use the model's own template"]
    if eos and eos not in r.marker:
        return [f"end-of-turn marker {r.marker!r} is trained but is not the tokenizer's eos_token {eos!r}: "
                "generation must stop on it (a model chatmask saves lists it in generation_config.json)"]
    return []


def _stop_notes(r: Renderer) -> list[str]:
    """The stops: an appended one, contexts that train none."""
    notes = []
    if r.append:
        notes.append(f"the template writes no end of turn after the last answer: its stop {r.append!r} is appended "
                     "there (the model writes it at inference), and counted (rows_stop_appended)")
    for ctx in sorted(r.unstopped - {"last"} if r.marker else set()):
        notes.append(f"no stop after an answer followed by a {ctx} message: such answers are trained without one "
                     "(rows_without_trained_stop counts them); pass --stop-tokens with the model's stop list")
    return notes


def _generation_prompt_notes(r: Renderer) -> list[str]:
    """A generation prompt that renders nothing: where the trained answer then starts."""
    if r.gen_prompt_empty and r.gen_always:
        return ["the template ignores add_generation_prompt and always ends with the assistant header: answers "
                "are trained from the end of that header"]
    if r.gen_prompt_empty:
        return ["add_generation_prompt renders nothing: answers are trained from their content, the assistant "
                "header is not"]
    return []


def _probe_notes(r: Renderer, name: str, roles: list[str]) -> list[str]:
    """What one probe conversation shows: the template raises, cannot be labelled, or rewrites earlier turns."""
    msgs = [{"role": ro, "content": f"text {j}"} for j, ro in enumerate(roles)]
    try:
        rendering = r.training_text(msgs)
    except TemplateError as e:
        return [f"raises on a conversation with {name}: {str(e).split(': ', 1)[-1]}"]
    try:
        turns = answer_regions(r, msgs, rendering, name)
    except TemplateError as e:
        return [f"cannot label a conversation with {name}: {e}"]
    if all(t.preserving for t in turns):
        return []
    return [f"not prefix-preserving ({name}): the template renders earlier turns differently from the generation "
            "prompt they were answered from; encode() trains each turn as rendered in the full conversation, "
            "encode_turns() gives one faithful example per turn"]
