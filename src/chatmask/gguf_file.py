"""A causal LM and its tokenizer as one GGUF file, laid out as llama.cpp's own converter lays it out.

`write_gguf(model, tokenizer, path, template=, stop_ids=, qtype=)` builds the file on the `gguf` package (its
GGUFWriter, its tensor name maps and its quantizers): the weights of a Llama-family model (SmolLM2, Llama 2/3,
Mistral), Qwen2 or Gemma 2; the vocabulary (byte-level BPE as `gpt2`, SentencePiece-style BPE with byte
fallback as `llama`, both with their merges); the chat template in `tokenizer.chat_template`; eos and the
trained end of turn (`tokenizer.ggml.eot_token_id`). `read_gguf(path)` is what a reader finds in it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import ConfigError

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2"}
"""model_type -> GGUF architecture: the ones transformers' GGUF loader reads back too (Gemma 1, Qwen3, Phi-3
and others have GGUF layouts llama.cpp knows, but no round trip here checks them, so they are refused)."""
QTYPES = ("f16", "bf16", "q8_0")
PRE_TOKENIZERS = {  # the split llama.cpp applies before BPE, by the digits rule and regex of the tokenizer
    "digits+bytelevel": "smollm", "qwen2": "qwen2", "llama3": "llama-bpe", "gpt2": "gpt-2"}
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")


def architecture(config) -> str:
    """The GGUF architecture of a model config, or a ConfigError saying which can be exported."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise ConfigError(f"cannot export a {mt!r} model to GGUF: chatmask writes {', '.join(sorted(ARCHITECTURES))} "
                          "(checked by reading them back); export the Hugging Face folder only (leave out --gguf) "
                          "and convert it with llama.cpp's convert_hf_to_gguf.py")
    scaling = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling not in (None, "default"):
        raise ConfigError(f"cannot export to GGUF a model with rope scaling {scaling!r} (not written yet); export "
                          "the Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    if mt == "gemma2" and config.query_pre_attn_scalar != config.head_dim:
        raise ConfigError("cannot export this Gemma 2 to GGUF: llama.cpp scales queries by the head size, this model "
                          f"by query_pre_attn_scalar={config.query_pre_attn_scalar}")
    return ARCHITECTURES[mt]


def _qtype(name: str):
    import gguf

    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f16": (T.F16, F.MOSTLY_F16), "bf16": (T.BF16, F.MOSTLY_BF16), "q8_0": (T.Q8_0, F.MOSTLY_Q8_0)}[name]


def _hparams(w, cfg, arch: str, rows: int) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(rows)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma2" or head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)


def _permute(w, heads: int):
    """HF's q/k rows (rotary halves) in llama.cpp's order (interleaved pairs), as its converter writes them."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _mapped(model, arch: str):
    """(HF name, GGUF name, tensor) for each weight of `model` that the file holds (a tied head is the embedding)."""
    import gguf

    cfg = model.config
    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(enum, cfg.num_hidden_layers)
    sd = model.state_dict()
    tied = "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for name, t in sd.items():
        if (name == "lm_head.weight" and tied) or "rotary_emb" in name:
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"cannot export {name} to GGUF: gguf's {arch} tensor map has no name for it")
        yield name, new, t


def tensor_names(model, arch: str) -> list[str]:
    """The GGUF names of `model`'s weights."""
    return [new for _, new, _ in _mapped(model, arch)]


def tensors(model, arch: str):
    """(GGUF name, float32 array) for each weight of `model`, laid out as llama.cpp reads it."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for name, new, t in _mapped(model, arch):
        data = t.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _permute(data, heads if "q_proj" in name else kv)
        if arch == "gemma2" and name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by 1 + w; llama.cpp's kernel by w
        yield new, data


def _pre_tokenizer(j: dict) -> str:
    """llama.cpp's name for the split before BPE (tokenizer.ggml.pre), read from the tokenizer's own rule."""
    pre = json.dumps(j.get("pre_tokenizer"))
    if '"Digits"' in pre and '"individual_digits": true' in pre and '"ByteLevel"' in pre:
        return PRE_TOKENIZERS["digits+bytelevel"]
    for key, regex in (("qwen2", _QWEN2), ("llama3", _LLAMA3)):
        if json.dumps(regex)[1:-1] in pre:
            return PRE_TOKENIZERS[key]
    if '"ByteLevel"' in pre and '"use_regex": true' in pre:
        return PRE_TOKENIZERS["gpt2"]
    raise ConfigError("cannot name this tokenizer's pre-tokenizer for llama.cpp (tokenizer.ggml.pre); chatmask "
                      f"knows {', '.join(sorted(PRE_TOKENIZERS.values()))}: {pre[:160]}")


def vocabulary(tok, rows: int) -> dict:
    """The tokenizer as GGUF spells it: model (gpt2 | llama), pre, tokens, token types, scores, merges and the
    space-prefix flag, padded to the embedding's `rows` with unused tokens."""
    import gguf

    T = gguf.TokenType
    j = json.loads(tok.backend_tokenizer.to_str())
    m = j["model"]
    sp = bool(m.get("byte_fallback"))
    if m.get("type") != "BPE" or not (sp or "ByteLevel" in json.dumps(j.get("decoder"))):
        raise ConfigError(f"cannot export a {m.get('type')} tokenizer to GGUF: chatmask writes byte-level BPE and "
                          "SentencePiece-style BPE (byte fallback) vocabularies")
    if len(tok) > rows:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but the model only {rows} embedding rows")
    tokens, types = [f"[PAD{i}]" for i in range(rows)], [T.UNUSED] * rows
    for t, i in m["vocab"].items():
        tokens[i], types[i] = t, (T.BYTE if sp and re.fullmatch(r"<0x[0-9A-F]{2}>", t) else T.NORMAL)
    for a in j.get("added_tokens", []):
        tokens[a["id"]], types[a["id"]] = a["content"], T.CONTROL if a["special"] else T.USER_DEFINED
    if tok.unk_token_id is not None and sp:
        types[tok.unk_token_id] = T.UNKNOWN
    merges = [" ".join(p) if isinstance(p, list) else p for p in m.get("merges", [])]
    scores = [0.0] * rows
    if sp:  # llama.cpp's SentencePiece merges the pair whose token scores highest: the earliest merge's
        scores = [-1e9] * rows
        index = m["vocab"]
        for rank, pair in enumerate(merges):
            i = index.get(pair.replace(" ", "", 1))
            if i is not None and scores[i] == -1e9:
                scores[i] = -float(rank)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return {"model": "llama" if sp else "gpt2", "pre": None if sp else _pre_tokenizer(j), "tokens": tokens,
            "types": types, "scores": scores, "merges": merges,
            "space_prefix": sp and tok.convert_ids_to_tokens(plain[:1])[0].startswith("\u2581")}


def _write_vocab(w, v: dict, tok, template: str, stop_ids) -> None:
    w.add_tokenizer_model(v["model"])
    if v["pre"]:
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    if v["model"] == "llama":
        w.add_token_scores(v["scores"])
        w.add_add_space_prefix(v["space_prefix"])
    w.add_token_merges(v["merges"])
    for add, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                     (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if tid is not None:
            add(tid)
    if stop_ids:
        w.add_eot_token_id(stop_ids[0])  # the trained end of turn: llama.cpp ends generation there
    # the rendered chat template is the whole prompt, as training encoded it and `chatmask chat` answers (a template
    # that wants a bos writes it): llama.cpp and Ollama must add none, or the model sees two (Gemma, Llama 2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(template)


def _add_tensor(w, name: str, data, qtype) -> None:
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or (qtype == T.Q8_0 and data.shape[-1] % 32):  # norms, biases, rows that do not block
        qtype = T.F32 if data.ndim == 1 else T.F16
    if qtype == T.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == T.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_gguf(model, tok, path: Path, *, template: str, stop_ids=(), qtype: str = "f16", name: str = "") -> None:
    """Write `model` (unquantized, LoRA merged) and `tok` as the GGUF file `path`, beside and renamed in (a kill
    leaves no half file there)."""
    import gguf

    from .models import vocab_rows
    from .paths import remove_stale

    arch = architecture(model.config)
    rows = vocab_rows(model)
    vocab = vocabulary(tok, rows)
    tq, ftype = _qtype(qtype)
    path = Path(path)
    remove_stale(path)  # the half file a killed export left
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(name or path.stem)
        w.add_file_type(ftype)
        if qtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, model.config, arch, rows)
        _write_vocab(w, vocab, tok, template, list(stop_ids))
        for tname, data in tensors(model, arch):
            _add_tensor(w, tname, data, tq)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_gguf(path) -> dict:
    """What the file holds, by gguf's reader: architecture, chat template, special ids, tokens and tensors
    (name -> (type, shape))."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    return {"architecture": field("general.architecture"), "chat_template": field("tokenizer.chat_template"),
            "eos": field("tokenizer.ggml.eos_token_id"), "eot": field("tokenizer.ggml.eot_token_id"),
            "bos": field("tokenizer.ggml.bos_token_id"), "tokens": len(r.fields["tokenizer.ggml.tokens"].data),
            "add_bos": field("tokenizer.ggml.add_bos_token"), "space_prefix": field("tokenizer.ggml.add_space_prefix"),
            "file_type": field("general.file_type"),
            "tensors": {t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape)) for t in r.tensors}}
