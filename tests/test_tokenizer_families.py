"""Issue #13: exact labels on every tokenizer family (tiny SentencePiece tokenizers, built in-process).

The rule: `encode(messages, tok, template=T).input_ids` is the tokenizer's whole-text tokenization of
`tok.apply_chat_template(messages, chat_template=T, tokenize=False)` (add_special_tokens=False), except where
a token of that tokenization would straddle a prompt/answer boundary: chatmask then re-spells it as its parts
and counts it in `Example.respelt`. The trained tokens are exactly each assistant turn's answer region: the
text after its generation prompt (header) through its end-of-turn marker.

The expected regions are derived here independently of chatmask: each assistant message's text, as the
template writes it (trimmed or not, with the spaces the template puts around it), is searched for in the
rendering right after the template's header string and right before its stop string; tokens are mapped to
characters with the tokenizer's own offsets on the whole-text encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")

import chatmask  # noqa: E402
from chatmask import templates  # noqa: E402

import sp_tokenizers as S  # noqa: E402

TEMPLATES_DIR = Path(__file__).parent / "data" / "templates"
IGNORE = -100


def read_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Spec:
    """How a template writes an assistant turn: header + lead + content (trimmed?) + tail + stop."""

    name: str
    jinja: str
    header: str  # the text just before the answer region (end of the generation prompt)
    stop: str | None  # the end-of-turn marker; None: the tokenizer's eos_token
    lead: str = ""
    tail: str = ""
    trim: bool = False
    system: bool = True  # renders a leading system message (False: the template raises on one)
    extra: tuple[str, ...] = ()  # special tokens the template needs added to a base tokenizer

    def stop_for(self, tok) -> str:
        return self.stop or tok.eos_token


def specs() -> dict[str, Spec]:
    return {
        "chatml": Spec("chatml", templates.get("chatml").jinja, "<|im_start|>assistant\n", "<|im_end|>",
                       extra=S.CHATML_TOKENS),
        "llama2": Spec("llama2", read_template("llama-2-chat"), "[/INST]", None, lead=" ", tail=" ", trim=True),
        "mistral-v0.1": Spec("mistral-v0.1", read_template("mistral-v0.1-instruct-original"), "[/INST]", None,
                             system=False),
        "mistral-v0.2": Spec("mistral-v0.2", read_template("mistral-v0.2-instruct"), "[/INST]", None, lead=" "),
        "mistral-v0.3": Spec("mistral-v0.3", read_template("mistral-v0.3-instruct"), "[/INST]", None, lead=" ",
                             trim=True),
        "zephyr": Spec("zephyr", templates.get("zephyr").jinja, "<|assistant|>\n", None),
        "gemma": Spec("gemma", read_template("gemma-it"), "<start_of_turn>model\n", "<end_of_turn>", trim=True,
                      system=False),
    }


TEMPLATES_FOR_KIND = {
    "llama": ("chatml", "llama2", "mistral-v0.1", "mistral-v0.2", "zephyr"),
    "mistral3": ("chatml", "mistral-v0.3"),
    "gemma": ("chatml", "gemma"),
}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


CONVERSATIONS = {
    "simple": [u("Hello!"), a("Hi there.")],
    "spaces": [u("  spaced question  "), a("  answer with  spaces  ")],
    "newlines": [u("Line one\nline two"), a("Sure!\n\n- one\n- two\n")],
    "unicode": [u("Ünïcödé ☃ 日本語?"), a("日本語 🙂 ☃ Ünïcödé")],
    "emoji-first": [u("🙂"), a("🙂 yes")],
    "digits": [u("What is 6*7?"), a("42.")],
    "multi": [u("Hi"), a("Hello! How are you today?"), u("Fine, thanks. Why is the sky blue?"),
              a("Because of Rayleigh scattering."), u("Thanks"), a("You are welcome.")],
    "system": [system("You are a helpful assistant."), u("Text: Q:\n\nHow can I restore my Unity?"),
               a("I've read this text."), u("What describes software in the text?"), a('["Unity"]')],
}


TOKENIZERS = [pytest.param(*c, id="-".join(c)) for c in S.all_combinations()]


def cases():
    out = []
    for kind, model_type, layout in S.all_combinations():
        for t in TEMPLATES_FOR_KIND[kind]:
            for conv in CONVERSATIONS:
                if conv == "system" and not specs()[t].system:
                    continue
                out.append(pytest.param(kind, model_type, layout, t, conv,
                                        id=f"{kind}-{model_type}-{layout}-{t}-{conv}"))
    return out


def tokenizer_for(kind, model_type, layout, spec: Spec):
    return S.hf_tokenizer(kind, model_type, layout, spec.extra)


# ---------------------------------------------------------------- the reference, derived independently


def render(tok, messages, spec: Spec) -> str:
    return tok.apply_chat_template(messages, chat_template=spec.jinja, tokenize=False)


def answer_regions(rendered: str, messages, spec: Spec, tok) -> list[tuple[int, int]]:
    """[start, end) of each assistant turn's answer region in the rendering: after the header, through the stop."""
    stop = spec.stop_for(tok)
    regions, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        body = m["content"].strip() if spec.trim else m["content"]
        needle = spec.header + spec.lead + body + spec.tail + stop
        at = rendered.find(needle, cursor)
        assert at >= 0, f"the {spec.name} rendering does not hold {needle!r} after {cursor}: {rendered!r}"
        regions.append((at + len(spec.header), at + len(needle)))
        cursor = at + len(needle)
    return regions


def whole_text(tok, rendered: str):
    enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def expected_mask(offsets, regions) -> tuple[list[bool], int]:
    """Which whole-text tokens are trained, and how many straddle a region boundary.

    A token is trained when its characters lie inside a region. A dummy-prefix `▁` that SentencePiece adds
    carries the offsets of the character it precedes, so it goes with that character."""
    mask, straddle = [], 0
    for s, e in offsets:
        if s == e:  # zero-width: goes with the character at s
            mask.append(any(rs <= s < re_ for rs, re_ in regions))
            continue
        mask.append(any(rs <= s and e <= re_ for rs, re_ in regions))
        straddle += any(s < b < e for r in regions for b in r)
    return mask, straddle


def piece_text(tok, ids) -> str:
    """The text the pieces spell, without any decoder (no stripping of a leading space): `▁` is a space,
    `<0xNN>` byte pieces are bytes, added tokens are their content."""
    out = bytearray()
    for p in tok.convert_ids_to_tokens(ids):
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", p)
        out += bytes([int(m.group(1), 16)]) if m else p.replace("▁", " ").encode("utf-8")
    return out.decode("utf-8", errors="replace")


def runs(labels) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < len(labels):
        if labels[i] == IGNORE:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != IGNORE:
            j += 1
        out.append((i, j))
        i = j
    return out


# ---------------------------------------------------------------- tests


PLAIN_TEXTS = [
    "Hello! How are you today?",
    'What describes software in the text? ["Unity"]',
    "Line one\nline two\n\n- one\n- two\n",
    "Ünïcödé ☃ 日本語 🙂 and tabs\tand  double  spaces  ",
    "6*7 = 42.",
]
LEADING_SPACE_TEXTS = [" leading space", "  two spaces", "\nnewline first"]


@pytest.mark.parametrize("kind,model_type,layout", TOKENIZERS)
def test_plain_text_matches_sentencepiece(kind, model_type, layout):
    tok = S.hf_tokenizer(kind, model_type, layout)
    sp = S.sp_processor(kind, model_type)
    texts = list(PLAIN_TEXTS)
    pre = tok.backend_tokenizer.pre_tokenizer
    # the tokenizers Metaspace pre-tokenizer does not prepend its `▁` to text that starts with a space, where
    # SentencePiece does (" x" -> ▁ x, not ▁▁ x): layouts built on it match SentencePiece from the first non-space
    if not (pre is not None and "Metaspace" in str(pre) and tok.backend_tokenizer.normalizer is None):
        texts += LEADING_SPACE_TEXTS
    for text in texts:
        got = tok(text, add_special_tokens=False)["input_ids"]
        want = sp.encode(text)
        assert got == want, (S.pipeline(tok), text, tok.convert_ids_to_tokens(got), sp.encode(text, out_type=str))
        # and offsets cover the text (what the label reference below relies on)
        offs = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert offs[0][0] == 0 and offs[-1][1] == len(text)


@pytest.mark.parametrize("kind,model_type,layout,template,conv", cases())
def test_labels_exact(kind, model_type, layout, template, conv):
    spec = specs()[template]
    tok = tokenizer_for(kind, model_type, layout, spec)
    messages = CONVERSATIONS[conv]
    rendered = render(tok, messages, spec)
    ids, offsets = whole_text(tok, rendered)
    regions = answer_regions(rendered, messages, spec, tok)
    mask, straddle = expected_mask(offsets, regions)

    ex = chatmask.encode(messages, tok, template=spec.jinja)
    respelt = ex.respelt
    assert len(ex.labels) == len(ex.input_ids)
    assert all(lab == IGNORE or lab == t for lab, t in zip(ex.labels, ex.input_ids)), \
        "a trained label differs from its input id"
    assert (respelt > 0) == (straddle > 0), (
        f"whole-text tokens straddling an answer boundary: {straddle}, Example.respelt: {respelt}")

    if respelt == 0:
        assert ex.input_ids == ids, (
            "input_ids differ from the whole-text tokenization of the rendering\n"
            f"  chatmask:   {tok.convert_ids_to_tokens(ex.input_ids)}\n  whole text: {tok.convert_ids_to_tokens(ids)}")
        trained = [lab != IGNORE for lab in ex.labels]
        assert trained == mask, (
            f"trained tokens differ\n  chatmask: {[t for t, m in zip(tok.convert_ids_to_tokens(ids), trained) if m]}\n"
            f"  expected: {[t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]}")
    else:
        # a re-spelt token: one trained run per answer, spelling exactly its region (a dummy-prefix space allowed)
        got = runs(ex.labels)
        assert len(got) == len(regions)
        for (i, j), (rs, re_) in zip(got, regions):
            text = piece_text(tok, ex.input_ids[i:j])
            assert text in (rendered[rs:re_], " " + rendered[rs:re_]), (text, rendered[rs:re_])


@pytest.mark.parametrize("kind,model_type,layout", TOKENIZERS)
def test_no_round_trip_error(kind, model_type, layout):
    """No conversation of any template this tokenizer serves raises "does not round-trip"."""
    failures = []
    for template in TEMPLATES_FOR_KIND[kind]:
        spec = specs()[template]
        tok = tokenizer_for(kind, model_type, layout, spec)
        for name, messages in CONVERSATIONS.items():
            if name == "system" and not spec.system:
                continue
            try:
                chatmask.encode(messages, tok, template=spec.jinja)
            except chatmask.TemplateError as e:
                if "round-trip" in str(e):
                    failures.append(f"{template}/{name}")
    assert not failures, f"TemplateError 'does not round-trip' on {len(failures)} rows: {failures}"


def test_reference_is_not_vacuous():
    """The reference finds trained tokens and the straddle check fires where a token crosses a boundary."""
    spec = specs()["chatml"]
    tok = tokenizer_for("llama", "bpe", "hub-json", spec)
    messages = CONVERSATIONS["multi"]
    rendered = render(tok, messages, spec)
    ids, offsets = whole_text(tok, rendered)
    regions = answer_regions(rendered, messages, spec, tok)
    mask, straddle = expected_mask(offsets, regions)
    assert len(regions) == 3 and straddle == 0
    trained_text = "".join(rendered[s:e] for (s, e), m in zip(offsets, mask) if m)
    assert trained_text == "".join(rendered[rs:re_] for rs, re_ in regions)
    assert sum(mask) < len(mask)
    # a region boundary placed inside a multi-character token is counted as a straddle
    k = next(i for i, (s, e) in enumerate(offsets) if e - s > 1)
    s, e = offsets[k]
    assert expected_mask(offsets, [(s + 1, len(rendered))])[1] == 1


def test_apply_chat_template_tokenizes_the_whole_text():
    """apply_chat_template(tokenize=True) is the whole-text tokenization without added special tokens."""
    spec = specs()["llama2"]
    for layout in ("llama-default", "llama-legacy", "hub-json"):
        tok = tokenizer_for("llama", "bpe", layout, spec)
        messages = CONVERSATIONS["multi"]
        out = tok.apply_chat_template(messages, chat_template=spec.jinja, tokenize=True)
        got = out["input_ids"] if hasattr(out, "keys") else out
        assert list(got) == whole_text(tok, render(tok, messages, spec))[0], layout
