"""Tiny SentencePiece tokenizers, trained in-process, loaded the ways users get them in transformers 5.

`sp_model(kind, model_type)` trains a ~400-piece SentencePiece model (about 0.3 s) on the inline corpus:

- kind "llama":    Llama 2 / Mistral v0.1 settings: add_dummy_prefix, byte_fallback, identity normalization,
                   whitespace kept, split digits; `<unk>`=0, `<s>`=1, `</s>`=2.
- kind "mistral3": the same plus control symbols `[INST]`=3, `[/INST]`=4 (Mistral v0.2/v0.3 style).
- kind "gemma":    Gemma settings: no dummy prefix, byte_fallback; `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3,
                   control `<mask>`, user-defined `<start_of_turn>`, `<end_of_turn>`.

`hf_tokenizer(kind, model_type, layout, extra=())` turns it into a Hugging Face tokenizer (cached per process;
callers must not mutate it, pass `chat_template=`/`template=` instead of setting it):

- "llama-default":   LlamaTokenizer.from_pretrained(folder with tokenizer.model)   (v5: Metaspace, prepend "first")
- "llama-legacy":    the same with legacy=True                                      (Metaspace, prepend "always")
- "llama-nonlegacy": the same with legacy=False                                     (Metaspace, prepend "first")
- "hub-json":        the tokenizer.json layout Llama 2 / Mistral hub repos ship: normalizer
                     Sequence([Prepend("▁"), Replace(" ", "▁")]), no pre-tokenizer, decoder
                     Sequence([Replace("▁", " "), ByteFallback(), Fuse(), Strip(" ", 1, 0)]), loaded as
                     PreTrainedTokenizerFast(tokenizer_file=...) so the pipeline is kept as written
- "hub-json-auto":   that folder (tokenizer.json + tokenizer_config.json naming LlamaTokenizer) loaded with
                     AutoTokenizer.from_pretrained: transformers 5 rebuilds the pipeline from the vocab and
                     merges (Metaspace "always", no normalizer), which is what users of such repos get now
- "gemma":           GemmaTokenizer.from_pretrained(folder with tokenizer.model)   (kind "gemma" only)
- "spm-generic":     PreTrainedTokenizerFast.from_pretrained(folder with tokenizer.model): transformers 5 builds
                     the pipeline from the proto itself (native Unigram for unigram models; Metaspace "always"
                     with a Replace(^▁ -> ▁▁) normalizer for dummy-prefix models)

Unigram models only get "spm-generic": LlamaTokenizer / GemmaTokenizer always build a BPE model, which does
not tokenize a unigram .model like SentencePiece does.

`extra` adds special tokens with `add_special_tokens` (e.g. ("<|im_start|>", "<|im_end|>") for ChatML on a
SentencePiece base model, as the post does on Gemma).
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import tempfile
from pathlib import Path

CORPUS = [
    "Text: Q:\n\nHow can I restore my Unity? I've read this text.",
    'What describes software in the text? ["Unity"] The quick brown fox jumps over the lazy dog.',
    "Hello! How are you today? I am fine, thank you. Ünïcödé ☃ 日本語 🙂 tabs\tand\nnewlines.",
    'def f(x):\n    return x + 1  # code, JSON {"a": [1, 2]} and <html> tags',
    "The answer is 42. Hi there, nice to meet you!  Double  spaces  and trailing spaces   ",
    "[INST] user message [/INST] assistant message. You are a helpful assistant, system prompt <<SYS>>",
    "Sure! Here is a list:\n- one\n- two\n\nThanks, that helps a lot. Why is the sky blue? Because of Rayleigh.",
]

KINDS = ("llama", "mistral3", "gemma")
MODEL_TYPES = ("bpe", "unigram")
LLAMA_LAYOUTS = ("llama-default", "llama-legacy", "llama-nonlegacy", "hub-json", "hub-json-auto", "spm-generic")
GEMMA_LAYOUTS = ("gemma", "spm-generic")
# transformers 5's LlamaTokenizer / GemmaTokenizer always build a BPE model: on a *unigram* .model they do not
# tokenize like SentencePiece (e.g. "What" -> ▁ W h a t instead of ▁Wh a t), so unigram gets the generic path
UNIGRAM_LAYOUTS = ("spm-generic",)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# token strings per kind: bos, eos, unk (and pad for gemma)
SPECIALS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral3": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
}


def layouts(kind: str, model_type: str = "bpe") -> tuple[str, ...]:
    if model_type == "unigram":
        return UNIGRAM_LAYOUTS
    return GEMMA_LAYOUTS if kind == "gemma" else LLAMA_LAYOUTS


@functools.cache
def _tmp_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="chatmask-sp-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def sp_model(kind: str, model_type: str = "bpe") -> bytes:
    """The serialized SentencePiece model proto."""
    import sentencepiece as spm

    common = dict(
        model_type=model_type, vocab_size=400, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        num_threads=1, minloglevel=2,
    )
    if kind in ("llama", "mistral3"):
        settings = dict(add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
        if kind == "mistral3":
            settings["control_symbols"] = ["[INST]", "[/INST]"]
    elif kind == "gemma":
        settings = dict(
            add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
            bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>"],
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        )
    else:
        raise ValueError(kind)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=out, **common, **settings)
    return out.getvalue()


@functools.cache
def sp_processor(kind: str, model_type: str = "bpe"):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sp_model(kind, model_type))


@functools.cache
def model_dir(kind: str, model_type: str = "bpe") -> Path:
    """A folder holding only tokenizer.model, like a hub repo before tokenizer.json existed."""
    d = _tmp_root() / f"{kind}-{model_type}-spm"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(sp_model(kind, model_type))
    return d


LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
LEGACY_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}


def write_hub_json(model_folder: Path, out: Path, specials: dict) -> Path:
    """Write the Llama 2 / Mistral v0.1 hub tokenizer.json layout (and a tokenizer_config.json) into `out`."""
    from transformers import LlamaTokenizer

    base = LlamaTokenizer.from_pretrained(str(model_folder), legacy=True)
    js = json.loads(base.backend_tokenizer.to_str())
    js["normalizer"] = LEGACY_NORMALIZER
    js["pre_tokenizer"] = None
    js["decoder"] = LEGACY_DECODER
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(js, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
              **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@functools.cache
def hub_json_dir(kind: str, model_type: str = "bpe") -> Path:
    return write_hub_json(model_dir(kind, model_type), _tmp_root() / f"{kind}-{model_type}-hubjson", SPECIALS[kind])


def load_spm_folder(folder: Path, layout: str, specials: dict, hub_json: Path | None = None):
    """A transformers tokenizer over the SentencePiece `folder`/tokenizer.model, loaded as `layout`
    (see the module docstring); `hub_json` is the folder `write_hub_json` wrote, for the hub-json layouts."""
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    if layout == "spm-generic":
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    if layout == "gemma":
        return GemmaTokenizer.from_pretrained(str(folder))
    if layout == "llama-default":
        return LlamaTokenizer.from_pretrained(str(folder))
    if layout == "llama-legacy":
        return LlamaTokenizer.from_pretrained(str(folder), legacy=True)
    if layout == "llama-nonlegacy":
        return LlamaTokenizer.from_pretrained(str(folder), legacy=False)
    if hub_json is None:
        hub_json = write_hub_json(folder, Path(tempfile.mkdtemp(dir=_tmp_root())), specials)
    if layout == "hub-json":
        return PreTrainedTokenizerFast(tokenizer_file=str(hub_json / "tokenizer.json"), **specials)
    if layout == "hub-json-auto":
        return AutoTokenizer.from_pretrained(str(hub_json))
    raise ValueError(layout)


def _load(kind: str, model_type: str, layout: str):
    if (kind == "gemma") != (layout in GEMMA_LAYOUTS) and layout != "spm-generic":
        raise ValueError(f"layout {layout!r} does not go with kind {kind!r}")
    hub = hub_json_dir(kind, model_type) if layout.startswith("hub-json") else None
    tok = load_spm_folder(model_dir(kind, model_type), layout, SPECIALS[kind], hub)
    if layout == "gemma":
        # Gemma's hub tokenizer marks its turn markers special; make sure they are, whatever the conversion did
        missing = [t for t in ("<start_of_turn>", "<end_of_turn>") if t not in tok.all_special_tokens]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


@functools.cache
def hf_tokenizer(kind: str, model_type: str = "bpe", layout: str = "llama-default", extra: tuple[str, ...] = ()):
    """A transformers tokenizer over the tiny SentencePiece model (cached: do not mutate it)."""
    tok = _load(kind, model_type, layout)
    if kind == "mistral3":
        # Mistral v0.3's hub tokenizer lists its control tokens as special added tokens
        extra = tuple(dict.fromkeys(("[INST]", "[/INST]") + tuple(extra)))
    new = [t for t in extra if t not in tok.all_special_tokens]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new})
    return tok


def pipeline(tok) -> str:
    """One line describing the backend pipeline (for test ids and reports)."""
    b = tok.backend_tokenizer
    return (f"{type(tok).__name__}: normalizer={b.normalizer} pre_tokenizer={b.pre_tokenizer} "
            f"model={type(b.model).__name__}")


def all_combinations():
    """(kind, model_type, layout) for every tiny tokenizer."""
    return [(k, m, lay) for k in KINDS for m in MODEL_TYPES for lay in layouts(k, m)]
