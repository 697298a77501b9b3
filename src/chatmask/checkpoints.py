"""What a training run saves, and the rule for resuming one.

`save_checkpoint` writes OUT/checkpoints/step-N beside and swaps it in (trainable weights as safetensors,
optimizer, scheduler, every RNG, the loop's `LoopState` as state.json); `load_checkpoint` restores them with
`torch.load(weights_only=True)`; FSDP / DeepSpeed runs go through accelerate's `save_state`. `save_model`
writes OUT/model. `saved_for_resume` is the resume policy: what a resumed call may change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config
from .config import DataConfig, TrainConfig
from .errors import ConfigError
from .paths import atomic_dir, atomic_write_text, swap_in

# ---------------------------------------------------------------- the loop's state (state.json)


@dataclass
class LoopState:
    """Where the training loop stands; state.json holds it under these keys (every checkpoint has since the
    first, so an old checkpoint still resumes)."""

    step: int = 0
    """optimizer steps done"""
    history: list[dict] = field(default_factory=list)
    """one log record per step (train_loss, lr, trained_tokens, tokens_per_s)"""
    evals: list[dict] = field(default_factory=list)
    """one record per evaluation (step, val_loss, seconds)"""
    trained_tokens: int = 0
    """labelled targets trained on, over every process"""
    input_tokens: int = 0
    """tokens fed to the model, padding excluded"""
    seconds: float = 0.0
    """time spent in training steps"""
    val_row_losses: list | None = None
    """[loss sum, tokens] per validation row, of the latest evaluation"""

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["val_row_losses"] is None:  # absent before the first evaluation, as it always was
            del out["val_row_losses"]
        return out

    @classmethod
    def from_json(cls, saved: dict) -> LoopState:
        """From state.json's dict; keys it does not know (python_random, restored apart) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def _write_state(folder: Path, state: LoopState) -> None:
    atomic_write_text(folder / "state.json", json.dumps({**state.to_json(), "python_random": random.getstate()},
                                                        default=list))


# ---------------------------------------------------------------- saving and loading


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model, opt, sched, state: LoopState, keep: int) -> Path:
    """Write OUT/checkpoints/step-N in a folder beside it, swapped in when complete (paths.atomic_dir): a
    kill mid-save leaves the checkpoints as they were."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(_trainable(model), str(tmp / "weights.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states(), tmp / "rng.pt")
        _write_state(tmp, state)

    final = atomic_dir(out / "checkpoints" / f"step-{step:06d}", write, like=latest_checkpoint(out))
    _prune(out / "checkpoints", keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; drop the half-written folders of killed saves (this process is the
    only one that writes checkpoints here, and it has finished writing)."""
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for left in root.glob(".step-*"):
        shutil.rmtree(left, ignore_errors=True)


def rng_states() -> dict:
    """Every torch random generator a training step can draw from (dropout, LoRA dropout): the CPU one and,
    where CUDA is in use, each GPU's. Python's `random` goes in state.json."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        if not torch.cuda.is_available():
            raise ConfigError("this checkpoint holds GPU random states but no GPU is available; resume it on a GPU")
        torch.cuda.set_rng_state_all(states["cuda"])


def is_sharded(acc) -> bool:
    return "FSDP" in str(acc.distributed_type) or "DEEPSPEED" in str(acc.distributed_type)


def save_sharded(acc, out: Path, state: LoopState, keep: int) -> None:
    """FSDP / DeepSpeed: weights and optimizer are sharded across processes, so accelerate writes them
    (every process takes part, into one folder beside the checkpoint's, swapped in by the main process once
    all are done); the loop state goes beside them. accelerate runs FSDP only on GPUs: tests/test_gpu.py
    resumes an FSDP run from these and gets the uninterrupted loss curve."""
    root = out / "checkpoints"
    final = root / f"step-{state.step:06d}"
    tmp = root / f".{final.name}.tmp-sharded"  # one name every process knows
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "accelerate"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_state(tmp, state)
        swap_in(tmp, final)
        _prune(root, keep)


def save(acc, out: Path, state: LoopState, model, opt, sched, keep: int) -> None:
    """The run's checkpoint at `state.step`, by every process: sharded (save_sharded) or by the main one."""
    acc.wait_for_everyone()
    if is_sharded(acc):
        save_sharded(acc, out, state, keep)
    elif acc.is_main_process:
        save_checkpoint(out, state.step, acc.unwrap_model(model), opt, sched, state, keep)
    acc.wait_for_everyone()


FILES = ("weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")
"""What a (not sharded) checkpoint holds; one missing makes it incomplete."""


def checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step-N folders that hold a state.json, oldest first."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def resume(acc, out: Path, model, opt, sched, say) -> LoopState | None:
    """Restore the newest checkpoint of `out` that reads whole into model, optimizer, schedule and RNG, and
    return its loop state (None: no checkpoint). One cut short, with a file missing or unreadable, is named and
    passed over for the one before it; none readable is a ConfigError."""
    found, bad = checkpoints(out), []
    for ck in reversed(found):
        try:
            if is_sharded(acc):  # sharded weights and optimizer: accelerate's own format
                acc.load_state(str(ck / "accelerate"))
                state = LoopState.from_json(json.loads((ck / "state.json").read_text()))
            else:
                missing = [f for f in FILES if not (ck / f).is_file()]
                if missing:
                    raise FileNotFoundError(f"{', '.join(missing)} missing")
                state = load_checkpoint(ck, acc.unwrap_model(model), opt, sched)
        except ConfigError:
            raise
        except Exception as e:  # safetensors, torch.load and json each fail their own way on a cut file
            bad.append(ck.name)
            say(f"--resume: checkpoint {ck} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                + ("trying the one before it" if ck != found[0] else "no older one"))
            continue
        say(f"resumed from {ck} (step {state.step})" + (f", past the unreadable {', '.join(bad)}" if bad else ""))
        return state
    if found:
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} can be read ({', '.join(bad)}); pass "
                          "another --out to start anew")
    return None


def read_state(path: Path) -> LoopState:
    """The loop state of checkpoint `path`, Python's random state restored from it."""
    saved = json.loads((path / "state.json").read_text())
    pr = saved.get("python_random")
    if pr is not None:
        random.setstate((pr[0], tuple(pr[1]), pr[2]))
    return LoopState.from_json(saved)


def load_checkpoint(path: Path, model, opt, sched) -> LoopState:
    """Restore weights, optimizer, scheduler and RNG; torch files are read with weights_only=True."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ConfigError(f"{path}: checkpoint does not fit this model (e.g. {missing[0]}); was it made with "
                          "other options?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_states(torch.load(path / "rng.pt", weights_only=True))
    return read_state(path)


def save_model(dest: Path, model, tok, data_cfg: DataConfig, cfg: TrainConfig, state_dict=None, say=print) -> None:
    """OUT/model: the model (or its adapters; merged with --merge-lora) as save_pretrained writes it, a
    generation config that stops where the run trained answers to stop, and the tokenizer with the chat
    template it was trained with; written beside and swapped in (paths.atomic_dir: a kill mid-save leaves
    the previous OUT/model whole). `state_dict`: the full weights gathered from a sharded run."""
    from .generation import run_renderer, save_chat_template, save_generation_config

    r = run_renderer(tok, data_cfg)
    written = {}

    def write(tmp: Path):
        m = model.merge_and_unload() if cfg.finetune == "lora" and cfg.merge_lora else model
        conf = getattr(m, "config", None)
        was = getattr(conf, "use_cache", None)
        if conf is not None:
            conf.use_cache = True  # switched off for training; a saved model answers with its cache
        try:
            m.save_pretrained(tmp, state_dict=state_dict)
        finally:
            if conf is not None:
                conf.use_cache = was
        written.update(save_generation_config(tmp, m, tok, r))
        save_chat_template(tmp, tok, r.text)

    atomic_dir(dest, write)
    if written.get("strings"):
        say(f"note: the stop(s) {', '.join(map(repr, written['strings']))} are several tokens for this tokenizer, "
            f"so {dest}/generation_config.json stops at {written['eos_token_id']} only: generate with "
            "stop_strings= and tokenizer= (chatmask chat does), or train with --add-template-tokens")
    if written.get("dropped"):
        say(f"note: the model's generation config sets {', '.join(written['dropped'])} where transformers does "
            f"not allow it (sampling flags without do_sample); {dest}/generation_config.json leaves them out")


# ---------------------------------------------------------------- the resume policy


def run_data(data, data_cfg: DataConfig) -> tuple[str, DataConfig]:
    """What a run trains on, as its config.json records it: (the data's path or name, the DataConfig its
    labels were made with). A prepared folder stands for its source data and the settings it was prepared
    with (its config.json), with this run's train_on, so that resume and compare's reuse of a finished run
    compare the real settings, whatever DataConfig the caller passed beside the folder."""
    from .prepare import prepared_config

    conf = prepared_config(data)
    if conf is None:
        return str(data), data_cfg
    names = {f.name for f in dataclasses.fields(DataConfig)}
    made = DataConfig(**{k: v for k, v in conf.items() if k in names})
    return str(conf.get("data") or data), dataclasses.replace(made, train_on=data_cfg.train_on)


def data_id(data) -> str:
    """What identifies a run's data: a file or folder by its real path, a prepared folder by its source's
    (read from its config.json; its shards are not read), anything else (a hub name) as given."""
    from .prepare import prepared_config

    conf = prepared_config(data)
    if conf is not None and conf.get("data"):
        data = conf["data"]
    return os.path.realpath(data) if isinstance(data, (str, os.PathLike)) and os.path.exists(data) else str(data)


def changed_settings(saved: dict, data, data_cfg: DataConfig, cfg: TrainConfig) -> tuple[dict, dict]:
    """(changes that change the run, changes RESUME_SAFE allows) between a run's saved config.json
    and a call with `data` (a file, a name or a prepared folder: see `run_data`) and these configs. The
    one rule of what makes a run another run, for resume and for compare's reuse of finished runs."""
    source, made = run_data(data, data_cfg)
    data_config = saved.get("data_config", {})
    if data_config.get("stop_tokens", "") is None and made is not data_cfg:
        # a run saved before prepared folders were recorded resolved its stops from the model's list as the
        # folder did (the model is compared); another --stop-tokens changes the validation tokens' hash
        data_config = {k: v for k, v in data_config.items() if k != "stop_tokens"}
    unsafe, safe = run_changes({**saved, "data_config": data_config}, made, cfg)
    if "data" in saved and data_id(saved["data"]) != data_id(source):
        unsafe = {"data": (saved["data"], source), **unsafe}
    return unsafe, safe


def saved_for_resume(out: Path, data, data_cfg: DataConfig, cfg: TrainConfig, say) -> dict | None:
    """With --resume and a checkpoint in `out`: the saved run's config (and its checkpoint_step), after
    checking that this call changes nothing that changes the run (RESUME_SAFE may change, and is
    said). Without --resume, a folder that holds a run is an error: it is never mixed with a new one."""
    ck = latest_checkpoint(out)
    if not cfg.resume:
        if ck is not None or (out / "log.jsonl").exists():
            held = f"checkpoints up to {ck.name}" if ck else "its log"
            raise ConfigError(f"{out} already holds a training run ({held}); pass --resume to continue it, or another "
                              "--out (or delete the folder) to start anew")
        return None
    if ck is None:
        say(f"--resume: no checkpoint in {out} yet; starting at step 0")
        return None
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {out} has checkpoints but no readable config.json; pass another --out "
                          "to start a new run") from None
    step = next((s for s in map(_step_of, reversed(checkpoints(out))) if s is not None), 0)
    unsafe, safe = changed_settings(saved, data, data_cfg, cfg)
    if unsafe:
        raise ConfigError(
            f"--resume: the run saved in {out} was started with other settings: {describe_changes(unsafe)}"
            .replace("--data ", "data ")
            + ". Drop those flags to continue it as saved (`chatmask train DATA --out OUT --resume` takes its "
              "settings), or pass another --out to start a new run")
    if safe:
        note = "; the learning-rate schedule now spans the new number of steps" if "steps" in safe else ""
        say(f"--resume: continuing with {describe_changes(safe)}{note}")
    return {**saved, "checkpoint_step": step}


def _step_of(ck: Path) -> int | None:
    try:
        return int(json.loads((ck / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resumable(saved: dict | None, out: Path, val_sha256: str, steps: int) -> None:
    """What only the prepared data and the resolved steps tell: the saved run scored the same validation
    tokens, and its checkpoint is not past this run's last step."""
    if not saved:
        return
    if saved.get("val_tokens_sha256") not in (None, val_sha256):
        raise ConfigError(f"--resume: the validation tokens differ from those of the run saved in {out} (the data "
                          "or its labels changed); pass another --out to start a new run on this data")
    if saved.get("checkpoint_step", 0) > steps:
        raise ConfigError(f"--resume: the checkpoint in {out} is at step {saved['checkpoint_step']}, past the "
                          f"{steps} steps of this run; pass --steps {saved['checkpoint_step']} or more")


# ---------------------------------------------------------------- the resume policy


RESUME_SAFE = frozenset({"steps", "eval_every", "save_every", "keep_checkpoints", "tensorboard", "eval_batch_size",
                         "merge_lora", "resume", "num_proc", "threads", "stop_prompts", "stop_max_new_tokens",
                         "micro_batch_tokens", "gradient_checkpointing"})
"""Settings a resumed run may change: they do not change what the saved steps computed (more --steps
lengthens the run and the schedule that remains; a micro-batch's size and recomputation leave the gradients)."""


def changed(saved: dict, cfg) -> dict[str, tuple]:
    """field -> (saved value, value in `cfg`) for the fields of `cfg` that differ from a saved config dict
    (fields a saved run predates are not compared)."""
    return {k: (saved[k], v) for k, v in config.to_dict(cfg).items() if k in saved and saved[k] != v}


def run_changes(saved: dict, data_cfg, train_cfg) -> tuple[dict, dict]:
    """(changes that change the run, changes RESUME_SAFE allows) between a run's saved config.json
    and the configs given now: what resume and a rerun of compare check before reusing a run."""
    diffs = {**changed(saved.get("data_config", {}), data_cfg), **changed(saved.get("train_config", {}), train_cfg)}
    unsafe = {k: v for k, v in diffs.items() if k not in RESUME_SAFE}
    return unsafe, {k: v for k, v in diffs.items() if k in RESUME_SAFE and k != "resume"}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{config.flag(k)} {old!r} -> {new!r}" for k, (old, new) in changes.items())
