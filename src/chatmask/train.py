"""The training loop: `train(data, data_cfg, train_cfg, out) -> dict`, on accelerate.

Loss = sum of token losses / number of trained tokens of the whole optimizer step (accumulation window
and every process), so arms and batch shapes are comparable. The LM head runs only where a label is
trained (`logits_to_keep` as a boolean mask, where a probe shows the model applies it). Evaluation
(evaluation.py) always scores the assistant tokens of one held-out split, whatever `train_on` is, and
measures the stop rate once at the end. Checkpoints hold weights, optimizer, scheduler and RNG states;
the data order is a pure function of (seed, step), so `resume` continues exactly. OUT/model stops where
the answers were trained to stop (its generation_config.json) and carries the chat template trained with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import batches, config
from .checkpoints import is_sharded, latest_checkpoint, load_checkpoint, save_checkpoint, save_sharded
from .config import DataConfig, TrainConfig  # noqa: F401 (TrainConfig: train.TrainConfig stays importable)
from .errors import ConfigError
# train.evaluate, train.split_rows, ... stay importable
from .evaluation import Split, evaluate, evaluate_rows, row_loss_sums, shift_targets, split_rows  # noqa: F401
from .labels import IGNORE

DEFAULT_STEPS = 100


# ---------------------------------------------------------------- loss


def sparse_head_works(model) -> bool:
    """True when `model(..., logits_to_keep=<boolean (B, T) mask>)` returns the full logits at exactly the
    masked positions, as (N, V): checked on a probe, never assumed from the signature (a model may take the
    argument and read it only as an int, or ignore it)."""
    from .models import logits_close, probing, vocab_rows

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


def token_loss_sum(model, batch: dict, sparse: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over trained targets, their number). Labels are shifted here, once."""
    ids = batch["input_ids"]  # (B, T)
    target, keep, kwargs = shift_targets(batch)
    n = int(keep.sum())
    if sparse and n:
        logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False, **kwargs).logits  # (N, V)
        y = target[keep]  # (N,)
    else:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # (B, T, V)
        logits, y = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.float(), y, ignore_index=IGNORE, reduction="sum")
    return loss, n


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device and dtype have one (CPU and CUDA
    do: 4x less optimizer time on CPU; the Trainer's default too), else the plain implementation."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kw)


# ---------------------------------------------------------------- the loop


def _prepared(data, data_cfg: DataConfig, tok, log):
    """A prepared folder as is (it must hold assistant labels), or prepare `data` into the cache."""
    import datasets

    from .prepare import prepare_cached, prepared_config

    conf = prepared_config(data)
    if conf is not None:
        if conf.get("train_on") != "assistant":
            raise ConfigError(f"{data} was prepared with --train-on {conf.get('train_on')}; training needs the "
                              "assistant labels (for validation): prepare it with --train-on assistant and pass "
                              "--train-on to train instead")
        return datasets.load_from_disk(str(data))
    return prepare_cached(str(data), config.replace(data_cfg, train_on="assistant"), tok, log=log).dataset()


@dataclass
class _Run:
    """What one training run holds while it runs: built by `_setup`, advanced by `_step`."""

    acc: object
    cfg: TrainConfig
    data_cfg: DataConfig
    out: Path
    say: object
    tok: object
    pad_id: int
    split: Split
    model: object
    opt: object
    sched: object
    attention: str
    sparse: bool
    mask_dtype: object
    state: dict = field(default_factory=lambda: {"step": 0, "history": [], "evals": [], "trained_tokens": 0,
                                                 "input_tokens": 0, "seconds": 0.0})
    lengths: list[int] | None = None


def train(data, data_cfg: DataConfig, cfg: TrainConfig, out, *, tokenizer=None, model=None, log=print,
          progress: bool = True, stop_after: int | None = None, on_end=None) -> dict:
    """Fine-tune `cfg.model` on `data` with `data_cfg.train_on` labels; evaluate on assistant tokens.

    Writes OUT/config.json, OUT/log.jsonl, OUT/result.json, OUT/checkpoints/, OUT/model/ (and OUT/tb/).
    `stop_after`: stop (as if killed) after that many steps of this call; for tests of --resume.
    `on_end(model, split) -> dict`: run on the main process after training (a task metric); stored as
    result["metric"].
    """
    run = _setup(data, data_cfg, cfg, Path(out), tokenizer, model, log)
    _resume(run)
    acc, state, cfg = run.acc, run.state, run.cfg  # run.cfg: --steps resolved (from --epochs)
    writer = _tensorboard(run.out, cfg, acc)
    bar = None
    try:
        if progress and acc.is_main_process:
            from .progress import progress as progress_bar

            bar = progress_bar(cfg.steps, f"train ({data_cfg.train_on})", "steps", initial=state["step"])
        if state["step"] == 0 and not state["evals"]:  # the curve starts where every arm starts: the same model
            _evaluate(run)
        run.model.train()
        done_here = 0
        while state["step"] < cfg.steps:
            rec = _step(run)
            if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
                rec["val_loss"] = _evaluate(run)
            if acc.is_main_process:
                _log_step(run.out, rec, writer)
                if bar is not None:
                    bar.update(1, loss=f"{rec['train_loss']:.4f}", lr=f"{rec['lr']:.2e}",
                               tok_s=f"{rec['tokens_per_s']:.0f}",
                               **({"val": f"{rec['val_loss']:.4f}"} if "val_loss" in rec else {}))
            if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
                _save(run)
            done_here += 1
            if stop_after is not None and done_here >= stop_after and state["step"] < cfg.steps:
                return {"stopped_at": state["step"]}
    finally:  # on every exit: finished, stopped, or an error
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return _finish(run, on_end, progress)


def total_steps(cfg: TrainConfig, n_rows: int, world: int) -> int:
    """--steps, or the steps --epochs makes: each step takes --batch-size x --grad-accum rows per process."""
    if cfg.epochs is None:
        return cfg.steps or DEFAULT_STEPS
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum * world)))


def _accelerator(cpu: bool):
    """accelerate's Accelerator with the mixed precision `accelerate launch` asked for, else none (chatmask
    sets the weights' dtype itself). accelerate keeps one state per process, so a Trainer run earlier in the
    same process with bf16 would otherwise make this run autocast to bf16 without a word; that state is
    reset (the process group is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    try:
        return Accelerator(cpu=cpu, mixed_precision=mp)
    except ValueError:
        AcceleratorState._reset_state()
        return Accelerator(cpu=cpu, mixed_precision=mp)


def _setup(data, data_cfg: DataConfig, cfg: TrainConfig, out: Path, tokenizer, model, log) -> _Run:
    """The accelerator, the prepared rows and their split, the model (with LoRA), optimizer and schedule."""
    from transformers import get_scheduler

    from .attention import packed_attention
    from .hub import data_tokenizer
    from .models import add_lora, checkpoint_activations, grow_embeddings, load_model

    # with no accelerator, say so: accelerate only sets up multi-process CPU (gloo) under torchrun when told
    no_device = not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()) \
        and not torch.backends.mps.is_available()
    acc = _accelerator(no_device)
    say = (log or (lambda *a: None)) if acc.is_main_process else (lambda *a: None)
    if cfg.threads and acc.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    world = acc.num_processes
    if is_sharded(acc) and cfg.finetune == "lora" and cfg.merge_lora:
        raise ConfigError("--merge-lora cannot merge adapters into sharded (FSDP / DeepSpeed) weights; train "
                          "without it and merge the saved adapters on one device")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created if missing)")
    saved = _saved_for_resume(out, data, data_cfg, cfg, say)
    tok = data_tokenizer(data_cfg, cfg.model, tokenizer, trust_remote_code=cfg.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with acc.main_process_first():
        ds = _prepared(data, data_cfg, tok, log if acc.is_main_process else None)
        val_ds = _prepared(cfg.val_data, data_cfg, tok, None) if cfg.val_data else None
    split = split_rows(ds, cfg, val_ds)
    if saved and saved.get("val_tokens_sha256") not in (None, split.val_sha256):
        raise ConfigError(f"--resume: the validation tokens differ from those of the run saved in {out} (the data "
                          "or its labels changed); pass another --out to start a new run on this data")
    given, cfg = cfg, dataclasses.replace(cfg, steps=total_steps(cfg, len(split.train), world))
    if saved and saved.get("checkpoint_step", 0) > cfg.steps:
        raise ConfigError(f"--resume: the checkpoint in {out} is at step {saved['checkpoint_step']}, past the "
                          f"{cfg.steps} steps of this run; pass --steps {saved['checkpoint_step']} or more")
    if given.epochs is not None:
        say(f"{given.epochs:g} epochs of {len(split.train):,} rows: {cfg.steps:,} steps")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"data": str(data), "data_config": config.to_dict(data_cfg), "train_config": config.to_dict(given),
                    "steps": cfg.steps, "processes": world, "distributed_type": str(acc.distributed_type),
                    "device": str(acc.device), "val_tokens": split.val_tokens, "val_tokens_sha256": split.val_sha256}
        (out / "config.json").write_text(json.dumps(resolved, indent=2))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if model is None:
        model = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code, quantize=cfg.quantize,
                           attn_implementation=cfg.attn_implementation)
    new_tokens = grow_embeddings(model, tok)
    if new_tokens:
        say(f"the tokenizer has {len(new_tokens)} token(s) the model lacks (--add-template-tokens): embeddings grown"
            + (", their rows trained with the adapters" if cfg.finetune == "lora" else ""))
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        checkpoint_activations(model)
    if cfg.finetune == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                         new_tokens=new_tokens)
    model.config.use_cache = False
    attention = packed_attention(model, acc.device, keep=cfg.attn_implementation is not None) if cfg.packing else "mask"
    if cfg.packing:
        say(f"packing: rows of up to {cfg.pack_tokens} tokens, examples kept apart by "
            + ("attention run per example (varlen)" if attention == "varlen" else "a block-diagonal mask"))
    sparse = cfg.sparse_loss and sparse_head_works(model)
    if cfg.sparse_loss and not sparse:
        say(f"note: {type(model).__name__} does not apply logits_to_keep as a mask of positions; computing full "
            "logits (same loss, more time and memory)")
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or (2e-4 if cfg.finetune == "lora" else 5e-5)
    opt = adamw(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=math.ceil(cfg.warmup * cfg.steps),
                          num_training_steps=cfg.steps)
    model, opt = acc.prepare(model, opt)
    if is_sharded(acc):
        acc.register_for_checkpointing(sched)
    lengths = [len(x) for x in split.train["input_ids"]] if cfg.group_by_length else None
    return _Run(acc, cfg, data_cfg, out, say, tok, pad_id, split, model, opt, sched, attention, sparse, dtype,
                lengths=lengths)


def busy_cores_elsewhere(seconds: float = 0.1) -> float | None:
    """How many cores other processes keep busy, from /proc/stat over `seconds` while this process waits
    (Linux; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:  # this process's own threads (torch's spin-waiting ones too)
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0), int(own[11]) + int(own[12])  # all, idle, ours

    try:
        t0, i0, o0 = sample()
        time.sleep(seconds)
        t1, i1, o1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    busy = (total - (i1 - i0)) - (o1 - o0)  # every core's busy jiffies, less this process's
    return max(0.0, (os.cpu_count() or 1) * busy / total) if total > 0 else None


def cpu_threads(cfg: TrainConfig, say) -> None:
    """--threads, or one thread per core other processes leave free: with two threads on two cores and
    another busy process, chatmask's step ran 1.75x slower than on one thread (bench/README.md). The
    command line calls it once, before training; `train()` itself only applies an explicit --threads (a
    library call does not change the process's thread count behind its caller's back)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return
    busy = busy_cores_elsewhere()
    have = torch.get_num_threads()
    if busy is None or busy < 0.75:
        return
    free = max(1, min(have, (os.cpu_count() or have) - round(busy)))
    if free < have:
        torch.set_num_threads(free)
        say(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: training on {free} thread(s) "
            f"instead of {have} (--threads N to choose)")


def _data_id(data) -> str:
    return os.path.realpath(data) if isinstance(data, (str, os.PathLike)) and os.path.exists(data) else str(data)


def _saved_for_resume(out: Path, data, data_cfg: DataConfig, cfg: TrainConfig, say) -> dict | None:
    """With --resume and a checkpoint in `out`: the saved run's config, after checking that this call
    changes nothing that changes the run (config.RESUME_SAFE may change, and is said)."""
    ck = latest_checkpoint(out)
    if not cfg.resume:
        if ck is not None or (out / "log.jsonl").exists():
            raise ConfigError(f"{out} already holds a training run ({'checkpoints up to ' + ck.name if ck else 'its log'});"
                              " pass --resume to continue it, or another --out (or delete the folder) to start anew")
        return None
    if ck is None:
        say(f"--resume: no checkpoint in {out} yet; starting at step 0")
        return None
    try:
        saved = json.loads((out / "config.json").read_text())
        step = json.loads((ck / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"--resume: {out} has checkpoints but no readable config.json; pass another --out "
                          "to start a new run") from None
    unsafe, safe = config.run_changes(saved, data_cfg, cfg)
    if "data" in saved and _data_id(saved["data"]) != _data_id(data):
        unsafe = {"data": (saved["data"], str(data)), **unsafe}
    if unsafe:
        raise ConfigError(
            f"--resume: the run saved in {out} was started with other settings: {config.describe_changes(unsafe)}"
            .replace("--data ", "data ")
            + ". Drop those flags to continue it as saved (`chatmask train DATA --out OUT --resume` takes its "
              "settings), or pass another --out to start a new run")
    if safe:
        note = "; the learning-rate schedule now spans the new number of steps" if "steps" in safe else ""
        say(f"--resume: continuing with {config.describe_changes(safe)}{note}")
    return {**saved, "checkpoint_step": step}


def _resume(run: _Run) -> None:
    """With --resume: weights, optimizer, schedule, RNG and the loop state from the last checkpoint."""
    ck = latest_checkpoint(run.out) if run.cfg.resume else None
    if ck is None:
        return
    acc = run.acc
    if is_sharded(acc):
        acc.load_state(str(ck / "accelerate"))  # sharded weights and optimizer: accelerate's own format
        state = json.loads((ck / "state.json").read_text())
        state.pop("python_random", None)
    else:
        state = load_checkpoint(ck, acc.unwrap_model(run.model), run.opt, run.sched)
    run.state = state
    run.say(f"resumed from {ck} (step {state['step']})")


def _step(run: _Run) -> dict:
    """One optimizer step over the step's global batch (every process, every micro-batch); its log record."""
    acc, cfg, state, model = run.acc, run.cfg, run.state, run.model
    world, rank = acc.num_processes, acc.process_index
    step = state["step"]
    t0 = time.perf_counter()
    rows = batches.global_batch(len(run.split.train), cfg, step, world, run.lengths)
    mbs, n_total = batches.micro_batches(run.split.train, rows, cfg, rank, world, run.pad_id,
                                         run.data_cfg.train_on, run.mask_dtype, run.attention)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for k, (mb, n_tok) in enumerate(mbs):
        mb = batches.to_device(mb, acc.device)
        tokens += n_tok
        with acc.no_sync(model) if k < len(mbs) - 1 else contextlib.nullcontext():
            s, _ = token_loss_sum(model, mb, run.sparse)
            # every process divides by the step's global count; DDP averages gradients over processes
            acc.backward(s * world / max(n_total, 1))
        loss_sum += s.detach().double().cpu()
    if cfg.max_grad_norm:
        # the prepared model's parameters: FSDP2 replaced the ones the optimizer was built from
        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    if world > 1:
        loss_sum = acc.reduce(loss_sum.to(acc.device), "sum").cpu()
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum"))
    dt = time.perf_counter() - t0
    state["step"] = step + 1
    state["trained_tokens"] += n_total
    state["input_tokens"] += tokens
    state["seconds"] += dt
    rec = {"step": step + 1, "train_loss": float(loss_sum / max(n_total, 1)), "lr": run.sched.get_last_lr()[0],
           "trained_tokens": n_total, "tokens_per_s": tokens / dt if dt else 0.0}
    state["history"].append(rec)
    return rec


def _evaluate(run: _Run) -> float:
    t1 = time.perf_counter()
    rows = evaluate_rows(run.model, run.split.val, run.pad_id, run.cfg.eval_batch_size, run.acc, run.sparse)
    v = float(rows[:, 0].sum() / rows[:, 1].sum())
    run.state["evals"].append({"step": run.state["step"], "val_loss": v, "seconds": time.perf_counter() - t1})
    run.state["val_row_losses"] = rows.tolist()  # the latest evaluation's, row by row
    return v


def _save(run: _Run) -> None:
    acc = run.acc
    acc.wait_for_everyone()
    if is_sharded(acc):
        save_sharded(acc, run.out, run.state, run.cfg.keep_checkpoints)
    elif acc.is_main_process:
        save_checkpoint(run.out, run.state["step"], acc.unwrap_model(run.model), run.opt, run.sched, run.state,
                        run.cfg.keep_checkpoints)
    acc.wait_for_everyone()


def _finish(run: _Run, on_end, progress: bool = False) -> dict:
    """The result, the stop rate, the task metric (`on_end`), OUT/model and OUT/result.json."""
    acc = run.acc
    result = _result(run.state, run.split, run.data_cfg)
    acc.wait_for_everyone()
    # FSDP / DeepSpeed hold shards: every process takes part in gathering the full weights
    full = acc.get_state_dict(run.model) if is_sharded(acc) else None
    one_device = full is None or acc.num_processes == 1  # generating on one process of several shards would hang
    if acc.is_main_process and run.cfg.stop_prompts:
        result["stop"] = _stop_rate(run, one_device, progress)
    if acc.is_main_process and on_end is not None and not one_device:
        result["metric"] = {"error": "not computed in a sharded multi-process run; score OUT/model on one device"}
        run.say(f"note: {result['metric']['error']}")
    elif acc.is_main_process and on_end is not None:
        result["metric"] = on_end(acc.unwrap_model(run.model), run.split)
    if acc.is_main_process:
        _save_final(run, acc.unwrap_model(run.model), full)
        (run.out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _stop_rate(run: _Run, one_device: bool, progress: bool) -> dict:
    """evaluation.stop_rate of the trained model, said in one line and logged to OUT/log.jsonl."""
    from . import evaluation
    from .errors import ChatmaskError
    from .generation import run_renderer

    if not one_device:
        res = {"prompts": 0, "error": "not measured in a sharded multi-process run; measure OUT/model on one device"}
    else:
        try:
            res = evaluation.stop_rate(run.acc.unwrap_model(run.model), run.tok, run.split.val,
                                       run_renderer(run.tok, run.data_cfg), prompts=run.cfg.stop_prompts,
                                       max_new_tokens=run.cfg.stop_max_new_tokens,
                                       batch_size=run.cfg.eval_batch_size, progress=progress)
        except ChatmaskError as e:  # no stop to measure (a template without an end of turn, no eos)
            res = {"prompts": 0, "error": str(e)}
    run.say(evaluation.describe(res))
    keys = ("prompts", "stop_rate", "header_rate", "ran_on_rate", "mean_new_tokens", "mean_reference_tokens",
            "max_new_tokens", "error")
    _log_step(run.out, {"step": run.state["step"], **{k: res[k] for k in keys if k in res}}, None)
    return res


def _tensorboard(out: Path, cfg: TrainConfig, acc):
    if not (cfg.tensorboard and acc.is_main_process):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


def _log_step(out: Path, rec: dict, writer) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    if writer is not None:
        for k in ("train_loss", "val_loss", "lr", "tokens_per_s"):
            if k in rec:
                writer.add_scalar(k, rec[k], rec["step"])


def _result(state: dict, split: Split, data_cfg: DataConfig) -> dict:
    evals = state["evals"]
    return {
        "train_on": data_cfg.train_on,
        "steps": state["step"],
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(e["val_loss"] for e in evals) if evals else None,
        "evals": evals,
        "train_losses": [h["train_loss"] for h in state["history"]],
        "trained_tokens": state["trained_tokens"],
        "input_tokens": state["input_tokens"],
        "train_seconds": state["seconds"],
        "val_tokens": split.val_tokens,
        "val_tokens_sha256": split.val_sha256,
        "train_rows": len(split.train),
        "val_rows": len(split.val),
        "val_row_losses": state.get("val_row_losses"),  # [loss sum, tokens] per validation row, final eval
    }


def _save_final(run: _Run, model, state_dict=None) -> None:
    """OUT/model: the model (or its adapters) as save_pretrained writes it, a generation config that stops
    where the run trained answers to stop, and the tokenizer with the chat template it was trained with;
    `state_dict`: the full weights gathered from a sharded run."""
    from .generation import run_renderer, save_chat_template, save_generation_config
    from .paths import atomic_dir

    r = run_renderer(run.tok, run.data_cfg)
    written = {}

    def write(tmp: Path):
        m = model
        if run.cfg.finetune == "lora" and run.cfg.merge_lora:
            m = m.merge_and_unload()
        conf = getattr(m, "config", None)
        was = getattr(conf, "use_cache", None)
        if conf is not None:
            conf.use_cache = True  # switched off for training; a saved model answers with its cache
        try:
            m.save_pretrained(tmp, state_dict=state_dict)
        finally:
            if conf is not None:
                conf.use_cache = was
        written.update(save_generation_config(tmp, m, run.tok, r))
        save_chat_template(tmp, run.tok, r.text)

    dest = run.out / "model"
    shutil.rmtree(dest, ignore_errors=True)
    atomic_dir(dest, write)
    if written.get("strings"):
        run.say(f"note: the stop(s) {', '.join(map(repr, written['strings']))} are several tokens for this tokenizer, "
                f"so {dest}/generation_config.json stops at {written['eos_token_id']} only: generate with "
                "stop_strings= and tokenizer= (chatmask chat does), or train with --add-template-tokens")
    if written.get("dropped"):
        run.say(f"note: the model's generation config sets {', '.join(written['dropped'])} where transformers does "
                f"not allow it (sampling flags without do_sample); {dest}/generation_config.json leaves them out")
