"""Generation as at inference: the stops a trained answer ends with, and greedy or sampled answers.

`stopping(tokenizer, r)` splits a Renderer's stops (`r.stops`: each trained end of turn, then eos) into
the ids `generate` stops on (stops that are one token here) and stop strings matched in the text (stops
that are several tokens for this tokenizer, e.g. a plain-text `<|im_end|>`); `generate_ids` answers token
prompts in left-padded batches and cuts each answer after its first stop; `generate_answers` renders
message lists first. `save_generation_config` writes the one-token stops into a saved model's folder.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

from .errors import ChatmaskError
from .messages import normalize_messages
from .spans import renderer as _renderer


@dataclass(frozen=True)
class Stopping:
    """How generation stops: what `generate` is given, and how an answer is cut after its stop."""

    stops: tuple[str, ...]
    """every stop, as text (the trained ends of turn first, then eos)"""
    ids: tuple[int, ...]
    """the stops that are one token for this tokenizer, as ids (generate's eos_token_id)"""
    strings: tuple[str, ...]
    """the stops that are several tokens here: generate's stop_strings"""
    pad: int
    """the id a finished row is padded with"""

    def kwargs(self, tokenizer) -> dict:
        """The stopping arguments of `model.generate`."""
        kw = {"eos_token_id": list(self.ids) or None, "pad_token_id": self.pad}
        if self.strings:
            kw.update(stop_strings=list(self.strings), tokenizer=tokenizer)
        return kw


def stop_tokens_of(value) -> tuple[str, ...]:
    """A model's own stop list as a tuple of strings: from a tuple / list, a comma-separated string, or None."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(s for s in items if s)


def renderer(tokenizer, template=None, end_of_turn=None, stop_tokens=()):
    """`spans.renderer`, given the model's stop list only when there is one."""
    stop_tokens = stop_tokens_of(stop_tokens)
    kw = {"stop_tokens": stop_tokens} if stop_tokens else {}
    return _renderer(tokenizer, template, end_of_turn, **kw)


def run_renderer(tokenizer, data_cfg):
    """The Renderer a run trains with: its --template, --end-of-turn and the stop list its rows were
    labelled with (--stop-tokens, else the model's own: `hub.stop_tokens`)."""
    from .hub import stop_tokens

    return renderer(tokenizer, getattr(data_cfg, "template", None), getattr(data_cfg, "end_of_turn", None),
                    stop_tokens(data_cfg, tokenizer))


def stops_of(tokenizer, r) -> tuple[str, ...]:
    """The stops the trained answers end with, eos included (`r.stops`; from `r.markers` on a Renderer
    that predates it)."""
    stops = getattr(r, "stops", None)
    if stops is None:
        eos = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
        stops = [m.strip() for m in r.markers.values() if m.strip()] + eos
    return tuple(dict.fromkeys(s.strip() for s in stops if s and s.strip()))


def headers_of(r) -> tuple[str, ...]:
    """The next messages' headers as the template renders them, stripped: what a model that does not stop
    writes next (`<|im_start|>user`)."""
    return tuple(dict.fromkeys(h.strip() for h in (getattr(r, "headers", None) or {}).values() if h and h.strip()))


def _one_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stopping(tokenizer, r) -> Stopping:
    """The `Stopping` of Renderer `r`'s stops for `tokenizer` (see the module's docstring)."""
    stops = stops_of(tokenizer, r)
    ids, strings = [], []
    for s in stops:
        i = _one_id(tokenizer, s)
        if i is None:
            strings.append(s)
        elif i not in ids:
            ids.append(i)
    if not ids and not strings:
        raise ChatmaskError("the tokenizer has no eos_token and the template no end-of-turn marker; generation would "
                            "never stop: set tokenizer.eos_token, or pass --end-of-turn")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = ids[0] if ids else (tokenizer.eos_token_id or 0)
    return Stopping(stops, tuple(ids), tuple(strings), pad)


def stop_ids(tokenizer, r) -> list[int]:
    """The ids of the stops of Renderer `r` that are one token for `tokenizer` (an added or special token,
    or a string it encodes as one id), eos included; longer stops are `stopping(...).strings`."""
    return list(stopping(tokenizer, r).ids)


@contextlib.contextmanager
def inference(model):
    """Eval mode and no gradients for a block; the model's mode is restored on every exit."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


def cut(tokenizer, st: Stopping, new: list[int]) -> tuple[list[int], bool]:
    """(the new tokens through their first stop, whether there was one): what follows a stop (padding,
    or a row's run-on) is not the answer."""
    at = next((k for k, t in enumerate(new) if t in st.ids), None)
    if at is not None:
        new = new[: at + 1]
    if st.strings and any(s in tokenizer.decode(new) for s in st.strings):
        lo, hi = 1, len(new)  # the shortest prefix holding a stop string ("holds one" only grows with length)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if any(s in tokenizer.decode(new[:mid]) for s in st.strings) else (mid + 1, hi)
        return new[:lo], True
    return new, at is not None


def answer_text(tokenizer, st: Stopping, ids: list[int]) -> str:
    """An answer's text as a person reads it: special tokens skipped, a trailing stop string dropped."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in st.strings:
        if text.rstrip().endswith(s):
            return text.rstrip()[: -len(s)]
    return text


def generate_ids(model, tokenizer, st: Stopping, prompts: list[list[int]], *, max_new_tokens: int = 64,
                 batch_size: int = 8, bar=None) -> list[tuple[list[int], bool]]:
    """Greedy answers to token `prompts`, in left-padded batches of similar lengths: per prompt (its new
    tokens through the first stop, whether it stopped within `max_new_tokens`)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))  # similar lengths together: less padding
    out: list = [None] * len(prompts)
    with inference(model):
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            T = max(len(prompts[k]) for k in chunk)
            # left padding: every prompt ends at column T, where generation starts
            pads = [T - len(prompts[k]) for k in chunk]
            ids = torch.tensor([[st.pad] * p + list(prompts[k]) for p, k in zip(pads, chunk)], device=device)  # (B, T)
            mask = torch.tensor([[0] * p + [1] * len(prompts[k]) for p, k in zip(pads, chunk)], device=device)  # (B, T)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, use_cache=True, **st.kwargs(tokenizer))  # (B, T + new)
            for k, row in zip(chunk, gen[:, T:].tolist()):
                out[k] = cut(tokenizer, st, row)
            if bar is not None:
                bar.update(len(chunk))
    return out


def prompt_ids(tokenizer, r, messages, control_tokens: str = "text") -> list[int]:
    """A conversation's generation prompt as token ids, encoded as its rows were in training: the tokenizer's
    encoding of the rendering (the template writes BOS), with a control token that a message's content writes
    as plain text unless --control-tokens parse (controls.py)."""
    msgs = normalize_messages(messages)
    text = r.render(msgs, add_generation_prompt=True)
    if control_tokens != "parse" and getattr(tokenizer, "backend_tokenizer", None) is not None:
        from . import controls
        from .tokens import ids_of, text_tokens

        tt = text_tokens(tokenizer)
        spans = controls.find(lambda ms: r.render(ms, add_generation_prompt=True), msgs, text, tt, "the prompt")
        if spans:
            return ids_of(controls.encode_rows(tt, [text], [spans])[0])
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_answers(model, tokenizer, prompts: list[list[dict]], *, template=None, end_of_turn=None, stop_tokens=(),
                     max_new_tokens=64, batch_size=8, progress: bool = False, control_tokens="text") -> list[str]:
    """Greedy answers to `prompts` (message lists ending with a user turn), rendered as at inference and
    stopped at the trained end of turn or eos; only the new text, special tokens skipped."""
    r = renderer(tokenizer, template, end_of_turn, stop_tokens)
    ids = [prompt_ids(tokenizer, r, p, control_tokens) for p in prompts]
    st = stopping(tokenizer, r)
    bar = None
    if progress:
        from .progress import progress as progress_bar

        bar = progress_bar(len(ids), "generating", "answers")
    try:
        got = generate_ids(model, tokenizer, st, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return [answer_text(tokenizer, st, new) for new, _ in got]


def save_generation_config(folder, model, tokenizer, r) -> dict:
    """Write FOLDER/generation_config.json so that a plain `model.generate(ids)` stops where the model was
    trained to: eos_token_id lists the one-token stops (trained ends of turn first, then eos), pad set; the
    model's own generation config's other fields are kept. Returns what was written, with `strings`: the
    stops too long to list there (generate needs them as stop_strings, with the tokenizer)."""
    from transformers import GenerationConfig

    st = stopping(tokenizer, r)
    own = getattr(model, "generation_config", None)
    gc = copy.deepcopy(own) if isinstance(own, GenerationConfig) else GenerationConfig()
    if st.ids:
        gc.eos_token_id = list(st.ids) if len(st.ids) > 1 else st.ids[0]
    gc.pad_token_id = st.pad
    if getattr(tokenizer, "bos_token_id", None) is not None and gc.bos_token_id is None:
        gc.bos_token_id = tokenizer.bos_token_id
    gc.use_cache = True  # training switched the cache off; answering wants it
    gc._from_model_config = False  # edited here: not to be rebuilt from config.json on load
    dropped = []
    try:
        gc.validate(strict=True)  # what save_pretrained insists on for an edited config
    except ValueError:  # the model's own config breaks a rule (temperature without do_sample, ...)
        gc, dropped = _valid_part(gc)
    gc.save_pretrained(str(folder))
    return {"eos_token_id": list(st.ids), "pad_token_id": st.pad, "strings": list(st.strings), "dropped": dropped}


def _valid_part(gc):
    """(the stops and ids of `gc` with each other field it sets that passes transformers' strict check, the
    fields left out)."""
    from transformers import GenerationConfig

    core = ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache")
    out = GenerationConfig(**{k: getattr(gc, k) for k in core})
    out._from_model_config = False
    dropped = []
    rest = {k: v for k, v in gc.to_diff_dict().items() if k not in core and not k.startswith("_")
            and k != "transformers_version"}
    for k in sorted(rest, key=lambda k: k != "do_sample"):  # do_sample first: the sampling flags need it
        trial = copy.deepcopy(out)
        setattr(trial, k, rest[k])
        try:
            trial.validate(strict=True)
            out = trial
        except ValueError:
            dropped.append(k)
    return out, dropped


def save_chat_template(folder, tokenizer, template_text: str) -> None:
    """`tokenizer.save_pretrained(folder)` with `template_text` as its chat template (the one the run was
    trained with); the caller's tokenizer is left as it was."""
    before = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = template_text
    try:
        tokenizer.save_pretrained(str(Path(folder)))
    finally:
        tokenizer.chat_template = before
