"""Run configuration: a frozen dataclass per concern, each field documented by the docstring under it.

`resolve(flags, run_file=..., resume_from=...)` is a run's configs (defaults < a saved run < YAML < flags); `build(cls,
section, flags)` makes one, `check(cfg)` reports all its problems in one error, `run_changes(saved, data_cfg,
train_cfg)` what --resume may change; flags.py makes the flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError

TrainOn = Literal["assistant", "all", "last_assistant"]
TRAIN_ON = get_args(TrainOn)  # the one spelling of --train-on's values (labels checks against it)
Truncation = Literal["turns", "right", "drop"]
TRUNCATION = get_args(Truncation)  # the one spelling of --truncation's values
Stream = Literal["rendering", "segments"]
STREAMS = get_args(Stream)  # the one spelling of --stream's values (labels.py says what each is)
Turns = Literal["full", "per-turn", "tree"]
ControlTokens = Literal["text", "parse", "refuse"]
CONTROL_TOKENS = get_args(ControlTokens)  # --control-tokens' values (controls.py says what each does)


@dataclass(frozen=True)
class DataConfig:
    """What becomes training data and how."""

    tokenizer: str | None = None
    """tokenizer: hub name, local folder, .gguf file, or 'smollm2' (the embedded default)"""
    template: str | None = None
    """chat template: a built-in name (chatml, llama3, ...) or Jinja text; default: the tokenizer's own"""
    add_template_tokens: bool = False
    """add the built-in --template's special tokens to a tokenizer lacking them and make it its template (a base
    model taught ChatML, as the post does for Gemma); training grows the embeddings and trains the new rows"""
    train_on: TrainOn = "assistant"
    """which tokens get labels: every assistant answer, everything (the unmasked baseline), or the last answer"""
    max_length: int | None = 2048
    """longest example in tokens; none: no limit"""
    truncation: Truncation = "turns"
    """rows over --max-length: keep whole leading turns, cut at the limit, or drop the row"""
    end_of_turn: str | None = None
    """the text that ends an assistant turn, where the template leaves it ambiguous (e.g. '<|end|>');
    default: found from the template"""
    stop_tokens: str | None = None
    """the model's stop tokens, comma-separated (e.g. '<|user|>,<|observation|>'), each answer's trained end read with
    them; default: generation_config.json's eos_token_id beside the tokenizer (folder or hub repo); none: eos only"""
    stream: Stream = "rendering"
    """token ids: the tokenizer's encoding of the whole rendered text, or each prompt/answer segment encoded
    alone (mistral-common's way)"""
    control_tokens: ControlTokens = "text"
    """control tokens (<|im_end|>, [INST]) written inside a message's content: plain text, as the vendors' encoders
    encode content (text); the control tokens, as apply_chat_template (parse); or the row refused (refuse)"""
    turns: Turns = "full"
    """how each turn is trained: in the whole rendering once (full); as one example per assistant turn, its prompt the
    history as inference renders it (per-turn: templates that rewrite earlier turns, as reasoning models drop old
    <think> blocks; K turns cost ~K^2/2 turns of tokens); or those examples as one tree-shaped row, the history once
    and each trained answer a branch (tree: per-turn's loss at about one conversation's tokens)"""
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    """row format of the data; auto: detected from the first row of each file"""
    split: str = "train"
    """split of a hub dataset or a saved DatasetDict"""
    skip_invalid: bool = False
    """drop rows that cannot become examples, and count them by reason, instead of stopping at the first"""
    salvage: bool = False
    """read the complete records of a JSON array that is cut off mid-record"""
    limit: int | None = None
    """use only the first N valid conversations of the data; none: all"""
    num_proc: int = 1
    """processes that label rows (output identical for any number)"""

    def _problems(self):
        from .templates import BUILTIN

        if self.turns != "full" and self.train_on == "last_assistant":
            return [f"--turns {self.turns} trains every assistant turn in its own prompt; --train-on last_assistant "
                    "trains one: use --turns full with it"]
        if self.add_template_tokens and self.template not in BUILTIN:
            return [f"--add-template-tokens adds a built-in template's tokens: pass --template with one of "
                    f"{', '.join(sorted(BUILTIN))}" + (f" (not {self.template[:40]!r})" if self.template else "")]
        return []


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune."""

    model: str = "smollm2"
    """causal LM: hub name, local folder, .gguf file, or 'smollm2' (the embedded default)"""
    finetune: Literal["lora", "full"] = "lora"
    """LoRA adapters (peft) or full fine-tuning"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)"""
    lora_dropout: float = 0.0
    """dropout on the LoRA path (default: 0, as torchtune's; it copies each adapted input: bench/README.md)"""
    lora_targets: str = "all-linear"
    """modules that get adapters: 'all-linear' or comma-separated names (q_proj,v_proj)"""
    merge_lora: bool = False
    """save the final model with the adapters merged into the weights"""
    lr: float | None = None
    """peak learning rate (default: 2e-4 for LoRA, 5e-5 for full fine-tuning)"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate schedule after warm-up"""
    warmup: float = 0.1
    """warm-up, as a fraction of the steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0: none)"""
    steps: int | None = None
    """optimizer steps (default: 100, unless --epochs)"""
    epochs: float | None = None
    """passes over the training rows instead of --steps: ceil(epochs x rows / (batch x grad-accum x processes))"""
    batch_size: int = 4
    """rows per micro-batch per process"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    packing: bool = False
    """pack a micro-batch into one row without padding (position ids restart per example, attention kept
    inside each; rows of --pack-tokens with a block-diagonal mask where that is unavailable)"""
    pack_tokens: int = 2048
    """token budget of a packed row where a block-diagonal mask is used (attention per example needs none)"""
    group_by_length: bool = False
    """put rows of similar length in the same micro-batch (less padding; order still seeded)"""
    sparse_loss: bool = True
    """apply the LM head only at trained positions (same loss and gradients, less time and memory)"""
    seed: int = 0
    """seed of the data order, LoRA init and dropout"""
    val_split: float = 0.02
    """fraction of the rows held out for validation (seeded by --split-seed, the same for every arm)"""
    split_seed: int = 0
    """seed of the validation split"""
    val_data: str | None = None
    """validation data instead of a split (any form `prepare` takes)"""
    val_rows: int | None = 200
    """at most this many validation rows; none: all"""
    eval_every: int = 20
    """evaluate every N steps (and at the end)"""
    eval_batch_size: int = 8
    """rows per evaluation batch"""
    stop_prompts: int = 8
    """validation prompts answered greedily after training to measure the stop rate (0: off)"""
    stop_max_new_tokens: int = 128
    """longest answer the stop rate waits for, in tokens (prompts whose trained answer is longer are passed over)"""
    save_every: int = 50
    """checkpoint every N steps (and at the end); --resume continues from the last one"""
    keep_checkpoints: int = 2
    """checkpoints kept on disk"""
    resume: bool = False
    """continue from the last checkpoint in --out"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """weights' dtype (and the compute dtype of --quantize 4bit)"""
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """load the base model quantized by bitsandbytes and train LoRA on it (QLoRA; 4bit: NF4, double quantized)"""
    micro_batch_tokens: int | None = None
    """most tokens (padding included) in a micro-batch: --batch-size rows are cut into smaller ones (same gradients),
    a longer row is one alone, evaluation takes 4x it; 0: no limit; default: 512 on a CPU, none on a GPU"""
    gradient_checkpointing: bool | None = None
    """recompute each layer's activations in the backward (same gradients, less memory, ~1.3x the time); default:
    for a micro-batch over --micro-batch-tokens only (a row longer than it); --no-gradient-checkpointing: never"""
    attn_implementation: str | None = None
    """attention kernel as transformers names it (sdpa, eager, flash_attention_2, ...); default: the model's,
    and with --packing attention per packed example"""
    threads: int | None = None
    """CPU threads torch uses (default: one per core other processes leave free at the start: bench/README.md)"""
    tensorboard: bool = True
    """write TensorBoard logs under OUT/tb"""
    trust_remote_code: bool = False
    """allow a model's own code from the hub (off: untrusted code never runs)"""

    def _problems(self):
        p = []
        if not 0 <= self.val_split < 1:
            p.append(f"--val-split must be in [0, 1), not {self.val_split}")
        if self.stop_prompts < 0:
            p.append(f"--stop-prompts must be 0 (off) or more, not {self.stop_prompts}")
        if self.steps is not None and self.epochs is not None:
            p.append(f"--steps {self.steps} and --epochs {self.epochs}: give one of them")
        if self.epochs is not None and self.epochs <= 0:
            p.append(f"--epochs must be more than 0, not {self.epochs}")
        if self.quantize != "none" and self.finetune == "full":
            p.append(f"--quantize {self.quantize} trains LoRA adapters on frozen quantized weights; full fine-tuning "
                     "of a quantized model is not possible: pass --finetune lora, or drop --quantize")
        if self.quantize != "none" and self.merge_lora:
            p.append("--merge-lora cannot merge adapters into quantized weights; merge the saved adapters into the "
                     "unquantized model after training")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            p.append(f"--micro-batch-tokens must be 0 (no limit) or more, not {self.micro_batch_tokens}")
        if self.val_split == 0 and not self.val_data:
            p.append("--val-split 0 needs --val-data (evaluation needs held-out rows)")
        return p


ARMS = {"masked": "assistant", "unmasked": "all"}


@dataclass(frozen=True)
class CompareConfig:
    """What to compare."""

    seeds: int = 1
    """seeds per arm (the same seeds for both arms)"""
    arms: str = "masked,unmasked"
    """arms to run: masked (train_on=assistant), unmasked (train_on=all)"""
    metric: Literal["none", "ner-f1"] = "none"
    """task metric by greedy generation: ner-f1 for UniversalNER-style data"""
    metric_data: str | None = None
    """conversations for a second metric set, e.g. a domain left out of training (the first set is always
    the validation rows)"""
    metric_questions: int = 100
    """at most this many questions per metric set"""
    metric_with_entities: float = 0.8
    """share of the metric's questions whose gold answer is not empty (the rest are empty)"""

    def _problems(self):
        bad = [a for a in self.arms.split(",") if a not in ARMS]
        out = [f"--arms: unknown arm(s) {', '.join(bad)}; known: {', '.join(ARMS)}"] if bad else []
        bad_share = not 0 < self.metric_with_entities <= 1
        return out + [f"--metric-with-entities must be in (0, 1]; got {self.metric_with_entities}"] * bad_share


@dataclass(frozen=True)
class ChatConfig:
    """How `chatmask chat` answers."""

    system: str | None = None
    """a system message at the start of the conversation"""
    max_new_tokens: int = 256
    """longest answer in tokens"""
    temperature: float = 0.7
    """sampling temperature; 0: greedy (the same answer every time)"""
    top_p: float = 0.9
    """nucleus sampling: sample from the smallest set of tokens holding this much probability"""
    seed: int | None = None
    """seed of the sampling (default: a different draw each run)"""

    def _problems(self):
        p = [f"--temperature must be 0 (greedy) or more, not {self.temperature}"] if self.temperature < 0 else []
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p must be in (0, 1], not {self.top_p}")
        return p


def flag(name: str) -> str:
    """The command-line spelling of a field: `max_length` -> `--max-length`."""
    return "--" + name.replace("_", "-")


def field_kind(tp):
    """(python type, choices or None) of a field's annotation: a Literal's values are its choices."""
    origin = get_origin(tp)
    args = [a for a in get_args(tp) if a is not type(None)]
    if origin is Literal:
        return str, list(get_args(tp))
    if args and origin is not None:  # X | None
        return field_kind(args[0])
    return tp, None


NONE = "none"
"""What an optional number takes for "no value", as a flag or in YAML (`--max-length none`: no limit)."""
AT_LEAST_ONE = ("max_length", "num_proc", "limit", "steps", "batch_size", "grad_accum", "eval_every", "save_every",
                "eval_batch_size", "pack_tokens", "threads", "stop_max_new_tokens", "max_new_tokens",
                "keep_checkpoints", "lora_r", "seeds", "metric_questions")
"""The counts of any config that must be 1 or more (where set)."""


def check(cfg):
    """Validate one config across fields; every problem reported together, naming the flags."""
    problems = []
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        tp, choices = field_kind(hints[f.name])
        if v is None:
            continue
        if choices and v not in choices:
            problems.append(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}, not {v!r}")
        elif tp in (int, float) and not isinstance(v, (int, float)) or tp is int and isinstance(v, float):
            problems.append(f"{flag(f.name)} must be a number, not {v!r}")
    for name in AT_LEAST_ONE:
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and v < 1:
            problems.append(f"{flag(name)} must be at least 1, not {v}")
    extra = getattr(cfg, "_problems", None)
    if callable(extra):
        problems += extra()
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def replace(cfg, **changes):
    return check(dataclasses.replace(cfg, **changes))


to_dict = dataclasses.asdict


def load_yaml(path: str | None, overrides=()) -> dict[str, dict]:
    """Sections of a YAML run file ({data: {...}, train: {...}, compare: {...}}) with `section.key=value`
    overrides applied (values parsed as YAML scalars)."""
    import yaml

    doc = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
            raise ConfigError(f"{path}: expected sections data:, train:, compare: holding key: value pairs")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=50")
        doc.setdefault(section, {})[name.replace("-", "_")] = yaml.safe_load(value)
    return doc


def build(cls, section: dict | None, flags=None, *, base: dict | None = None, **extra):
    """`cls` from defaults < `base` (a saved run's config) < YAML `section` < `flags` given (an object whose
    attributes are named as the fields, None where not given, as argparse's namespace) < `extra`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section or {}) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"valid: {', '.join(sorted(names))}")
    values = {k: v for k, v in (base or {}).items() if k in names}
    values.update(section or {})
    given = {n: getattr(flags, n, None) for n in names} if flags is not None else {}
    values.update({k: v for k, v in {**given, **extra}.items() if v is not None})
    numbers = {n for n, tp in get_type_hints(cls).items() if field_kind(tp)[0] in (int, float)}
    values = {k: None if k in numbers and str(v).strip().lower() == NONE else v for k, v in values.items()}
    try:
        return check(cls(**values))
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def saved_run(out) -> dict:
    """The config.json a run saved in folder `out` (what `train DATA --out OUT --resume` continues), with
    resume on; {} where there is none yet (a first start with --resume)."""
    try:
        saved = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {**saved, "train_config": {**saved.get("train_config", {}), "resume": True}}


def resolve(flags=None, *, run_file: str | None = None, overrides=(), resume_from=None, compare: bool = False):
    """A run's (DataConfig, TrainConfig, CompareConfig or None without `compare`).

    Each field comes from the first that sets it of: `flags` (as in `build`), the YAML `run_file` with its
    `section.key=value` `overrides`, the config a run saved in the folder `resume_from` (`saved_run`; a
    resumed run is checked against it by train), the defaults. The data's tokenizer defaults to the flags'
    --model. Every problem of every section is reported in one ConfigError."""
    doc = load_yaml(run_file, overrides)
    unknown = sorted(set(doc) - {"data", "train", "compare"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)} in the run file; valid: data, train, compare")
    saved = saved_run(resume_from) if resume_from is not None else {}
    tokenizer = getattr(flags, "tokenizer", None) or getattr(flags, "model", None)
    sections = {"data": (DataConfig, {"tokenizer": tokenizer}), "train": (TrainConfig, {})}
    if compare:
        sections["compare"] = (CompareConfig, {})
    made, problems = {}, []
    for name, (cls, extra) in sections.items():
        try:
            made[name] = build(cls, doc.get(name), flags, base=saved.get(f"{name}_config"), **extra)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return made["data"], made["train"], made.get("compare")
