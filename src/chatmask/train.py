"""The training loop: `train(data, data_cfg, train_cfg, out) -> dict`, on accelerate.

Set up in three steps (data, model, optimizer), then step, evaluate, save. Loss = sum of token losses / trained
tokens of the whole optimizer step (accumulation window and every process), so arms and batch shapes compare;
the LM head runs only at trained positions where a probe shows the model applies `logits_to_keep` as a mask.
Evaluation: evaluation.py; checkpoints, OUT/model and the resume policy: checkpoints.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import batches, checkpoints, config, guards, memory
from .checkpoints import (LoopState, check_resumable, is_sharded, latest_checkpoint, run_data, save_model,
                          saved_for_resume)
from .config import DataConfig, TrainConfig
from .devices import accelerator
from .errors import ConfigError
from .evaluation import Holdout, evaluate_rows, hold_out, shift_targets
from .labels import IGNORE
from .paths import atomic_write_text
from .progress import log_step, tensorboard_writer as _tensorboard  # a name tests replace

DEFAULT_STEPS = 100


# ---------------------------------------------------------------- loss


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


def total_steps(cfg: TrainConfig, n_rows: int, world: int) -> int:
    """--steps, or the steps --epochs makes: each step takes --batch-size x --grad-accum rows per process."""
    if cfg.epochs is None:
        return cfg.steps or DEFAULT_STEPS
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum * world)))


# ---------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What one training run holds while it runs: built by `_setup`'s three steps, advanced by `_step`."""

    acc: object
    cfg: TrainConfig  # --steps resolved (from --epochs)
    data_cfg: DataConfig  # what labelled the rows: a prepared folder's own settings (checkpoints.run_data)
    out: Path
    say: object
    tok: object
    pad_id: int
    holdout: Holdout
    model: object = None
    opt: object = None
    sched: object = None
    attention: str = "mask"
    sparse: bool = False
    mask_dtype: object = None
    state: LoopState = field(default_factory=LoopState)
    lengths: list[int] | None = None
    budget: int | None = None  # --micro-batch-tokens resolved for the device (memory.budget)
    checkpointing: str = "never"  # memory.checkpointing: always | over budget | never
    signals: object = None  # guards.Signals: a SIGTERM / SIGINT ends the run after its step
    heap_trim: bool = False  # memory tight on a CPU (memory.TIGHT_SHARE): micro-batches return their heap


def train(data, data_cfg: DataConfig, cfg: TrainConfig, out, *, tokenizer=None, model=None, log=print,
          progress: bool = True, stop_after: int | None = None, on_end=None, base_eval: dict | None = None) -> dict:
    """Fine-tune `cfg.model` on `data` with `data_cfg.train_on` labels; evaluate on assistant tokens.

    `data`: a file, a hub name, or a folder written by `prepare` (used as is, with its own settings).
    Writes OUT/config.json, OUT/log.jsonl, OUT/result.json, OUT/checkpoints/, OUT/model/ (and OUT/tb/).
    `stop_after`: stop (as if killed) after that many steps of this call; for tests of --resume.
    `on_end(model, holdout) -> dict`: run on the main process after training (a task metric); stored as
    result["metric"].
    `base_eval`: {"val_tokens_sha256", "val_loss"} of another run's step 0 on the same model (compare's arms):
    taken instead of scoring step 0 again where the validation tokens' hash is the same.
    """
    acc = accelerator()
    with guards.run_lock(Path(out), acc.is_main_process), guards.Signals() as signals:
        run = _setup(acc, data, data_cfg, cfg, Path(out), tokenizer, model, log)
        if cfg.resume:
            run.state = checkpoints.resume(acc, run.out, run.model, run.opt, run.sched, run.say) or run.state
        run.signals = signals
        return _loop(run, on_end, progress, stop_after, base_eval)


def _loop(run: _Run, on_end, progress: bool, stop_after: int | None, base_eval: dict | None) -> dict:
    """Evaluate step 0, step, evaluate and save to the last step, then conclude; a signal ends it after a step."""
    acc, state, cfg = run.acc, run.state, run.cfg
    writer = _tensorboard(run.out, cfg, acc)
    bar = None
    try:
        if progress and acc.is_main_process:
            from .progress import progress as progress_bar

            bar = progress_bar(cfg.steps, f"train ({run.data_cfg.train_on})", "steps", initial=state.step)
        if state.step == 0 and not state.evals:  # the curve starts where every arm starts: the same model
            if base_eval and base_eval["val_tokens_sha256"] == run.holdout.val_sha256:
                state.evals.append({"step": 0, "val_loss": base_eval["val_loss"], "seconds": 0.0, "shared": True})
            else:
                _evaluate(run)
        run.model.train()
        done_here = 0
        while state.step < cfg.steps:
            rec = _step(run)
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                rec["val_loss"] = _evaluate(run)
            if acc.is_main_process:
                log_step(run.out, rec, writer)
                if bar is not None:
                    bar.update(1, loss=f"{rec['train_loss']:.4f}", lr=f"{rec['lr']:.2e}",
                               tok_s=f"{rec['tokens_per_s']:.0f}",
                               **({"val": f"{rec['val_loss']:.4f}"} if "val_loss" in rec else {}))
            got = guards.received(acc, run.signals)  # read once: a signal between two reads would go unsaved
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or got:
                _save(run)
            _stop_if_signalled(run, got)
            done_here += 1
            if stop_after is not None and done_here >= stop_after and state.step < cfg.steps:
                return {"stopped_at": state.step}
    finally:  # on every exit: finished, stopped, or an error
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return _conclude(run, on_end, progress)


def _setup(acc, data, data_cfg: DataConfig, cfg: TrainConfig, out: Path, tokenizer, model, log) -> _Run:
    """The run's three steps as torchtune's recipes lay them out: data, model, optimizer."""
    say = (log or (lambda *a: None)) if acc.is_main_process else (lambda *a: None)
    if cfg.threads and acc.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    run = _setup_data(acc, say, data, data_cfg, cfg, out, tokenizer, log)
    _setup_model(run, model)
    _setup_optimizer(run)
    return run


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


def _setup_data(acc, say, data, data_cfg: DataConfig, cfg: TrainConfig, out: Path, tokenizer, log) -> _Run:
    """The data step: the resume policy checked, the tokenizer, the prepared rows with their held-out
    validation rows, --steps resolved, and OUT/config.json (the settings that made the labels)."""
    from .hub import data_tokenizer

    if is_sharded(acc) and cfg.finetune == "lora" and cfg.merge_lora:
        raise ConfigError("--merge-lora cannot merge adapters into sharded (FSDP / DeepSpeed) weights; train "
                          "without it and merge the saved adapters on one device")
    saved = saved_for_resume(out, data, data_cfg, cfg, say)
    source, made = run_data(data, data_cfg)  # a prepared folder: its own tokenizer, template and stops
    tok = data_tokenizer(made, cfg.model, tokenizer, trust_remote_code=cfg.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with acc.main_process_first():
        ds = _prepared(data, made, tok, log if acc.is_main_process else None)
        val_ds = _prepared(cfg.val_data, made, tok, None) if cfg.val_data else None
    holdout = hold_out(ds, cfg, val_ds)
    given, cfg = cfg, replace(cfg, steps=total_steps(cfg, len(holdout.train), acc.num_processes))
    check_resumable(saved, out, holdout.val_sha256, cfg.steps)
    if given.epochs is not None:
        say(f"{given.epochs:g} epochs of {len(holdout.train):,} rows: {cfg.steps:,} steps")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"data": source, "data_config": config.to_dict(made), "train_config": config.to_dict(given),
                    "steps": cfg.steps, "processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
                    "device": str(acc.device), "val_tokens": holdout.val_tokens,
                    "val_tokens_sha256": holdout.val_sha256}
        if made is not data_cfg:
            resolved["prepared"] = str(data)  # the folder trained on; "data" names its source
        atomic_write_text(out / "config.json", json.dumps(resolved, indent=2))
    return _Run(acc, cfg, made, out, say, tok, pad_id, holdout)


def _setup_model(run: _Run, model) -> None:
    """The model step: loaded (quantized), embeddings grown for added tokens, activations checkpointed,
    LoRA; then how it packs examples and whether its head takes a mask of positions."""
    from .attention import packed_attention, require_tree_attention
    from .models import add_lora, checkpoint_activations, grow_embeddings, keep_4bit_trainable, load_model, \
        sparse_head_works

    cfg, say = run.cfg, run.say
    run.budget = memory.budget(cfg, run.acc.device)
    run.checkpointing = memory.checkpointing(cfg, run.budget)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    run.mask_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if model is None:
        model = load_model(cfg.model, dtype=run.mask_dtype, trust_remote_code=cfg.trust_remote_code,
                           quantize=cfg.quantize, attn_implementation=cfg.attn_implementation)
    new_tokens = grow_embeddings(model, run.tok)
    if new_tokens:
        say(f"the tokenizer has {len(new_tokens)} token(s) the model lacks (--add-template-tokens): embeddings grown"
            + (", their rows trained with the adapters" if cfg.finetune == "lora" else ""))
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=run.checkpointing != "never",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_4bit_trainable(model)  # before any forward pass (the probe below, the first evaluation)
    elif run.checkpointing != "never":
        checkpoint_activations(model)
    memory.set_recompute(model, run.checkpointing == "always")  # "over budget": per micro-batch, in _step
    if cfg.finetune == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                         new_tokens=new_tokens)
    model.config.use_cache = False
    if cfg.packing:
        run.attention = packed_attention(model, run.acc.device, keep=cfg.attn_implementation is not None)
        say(f"packing: rows of up to {cfg.pack_tokens} tokens, examples kept apart by "
            + ("attention run per example (varlen)" if run.attention == "varlen" else "a block-diagonal mask"))
    require_tree_attention(model, run.attention if cfg.packing else None, run.data_cfg.turns)
    run.sparse = cfg.sparse_loss and sparse_head_works(model)
    if cfg.sparse_loss and not run.sparse:
        say(f"note: {type(model).__name__} does not apply logits_to_keep as a mask of positions; computing full "
            "logits (same loss, more time and memory)")
    run.model = model
    if run.acc.device.type == "cpu":  # RSS is the memory that runs out there; on a GPU torch says it itself
        line, _, run.heap_trim = memory.estimate_for(run.holdout.train, model, cfg, run.budget, run.checkpointing,
                                                     run.data_cfg.train_on, run.sparse)
        say(line)


def _setup_optimizer(run: _Run) -> None:
    """The optimizer step: AdamW on the trainable parameters, the schedule, both handed to accelerate."""
    from transformers import get_scheduler

    cfg, acc = run.cfg, run.acc
    params = [p for p in run.model.parameters() if p.requires_grad]
    lr = cfg.lr or (2e-4 if cfg.finetune == "lora" else 5e-5)
    opt = adamw(params, lr=lr, weight_decay=cfg.weight_decay)
    run.sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=math.ceil(cfg.warmup * cfg.steps),
                              num_training_steps=cfg.steps)
    run.model, run.opt = acc.prepare(run.model, opt)
    if is_sharded(acc):
        acc.register_for_checkpointing(run.sched)
    run.lengths = batches.row_lengths(run.holdout.train) if cfg.group_by_length else None


def _step(run: _Run) -> dict:
    """One optimizer step over the step's global batch (every process, every micro-batch); its log record."""
    acc, cfg, state, model = run.acc, run.cfg, run.state, run.model
    world, rank = acc.num_processes, acc.process_index
    step = state.step
    t0 = time.perf_counter()
    indices = batches.global_batch(len(run.holdout.train), cfg, step, world, run.lengths)
    mbs, n_total = batches.micro_batches(run.holdout.train, indices, cfg, rank, world, run.pad_id,
                                         run.data_cfg.train_on, run.mask_dtype, run.attention, run.budget)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens, first_bad = 0, None
    for k, (mb, n_tok, rows) in enumerate(mbs):
        mb = batches.to_device(mb, acc.device)
        tokens += n_tok
        with acc.no_sync(model) if k < len(mbs) - 1 else contextlib.nullcontext(), \
                memory.micro_batch(model, run.checkpointing, mb["input_ids"].numel(), run.budget, acc.device,
                                   run.heap_trim):
            s, _ = token_loss_sum(model, mb, run.sparse)
            if run.heap_trim:  # the forward's temporaries: ~0.1 GB off the backward's peak
                memory.trim(acc.device)
            # every process divides by the step's global count; DDP averages gradients over processes
            acc.backward(s * world / max(n_total, 1))
        loss_sum += s.detach().double().cpu()
        first_bad = rows if first_bad is None and not torch.isfinite(s) else first_bad
    # the prepared model's parameters (FSDP2 replaced the optimizer's); inf: the norm, nothing clipped
    norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    loss, norm = float(loss_sum / max(n_total, 1)), float(norm if norm is not None else 0.0)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        bad = first_bad if first_bad is not None else [i for _, _, r in mbs for i in r]
        raise guards.non_finite(step + 1, loss, norm, guards.sources(run.holdout.train, bad),
                                latest_checkpoint(run.out))
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    if world > 1:
        loss_sum = acc.reduce(loss_sum.to(acc.device), "sum").cpu()
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum"))
    dt = time.perf_counter() - t0
    state.step = step + 1
    state.trained_tokens += n_total
    state.input_tokens += tokens
    state.seconds += dt
    rec = {"step": step + 1, "train_loss": float(loss_sum / max(n_total, 1)), "lr": run.sched.get_last_lr()[0],
           "trained_tokens": n_total, "tokens_per_s": tokens / dt if dt else 0.0, "peak_rss_gb": memory.rss_gb("VmHWM")}
    state.history.append(rec)
    return rec


def _evaluate(run: _Run) -> float:
    t1 = time.perf_counter()
    table = evaluate_rows(run.model, run.holdout.val, run.pad_id, run.cfg.eval_batch_size, run.acc, run.sparse,
                          memory.eval_budget(run.budget))
    v = float(table[:, 0].sum() / table[:, 1].sum())
    run.state.evals.append({"step": run.state.step, "val_loss": v, "seconds": time.perf_counter() - t1})
    run.state.val_row_losses = table.tolist()  # the latest evaluation's, row by row
    return v


def _save(run: _Run) -> None:
    checkpoints.save(run.acc, run.out, run.state, run.model, run.opt, run.sched, run.cfg.keep_checkpoints)


def _stop_if_signalled(run: _Run, got: int | None = None) -> None:
    """After a saved step (`got`: the signal as read before saving) or in the conclusion: a signal ends the run."""
    got = guards.received(run.acc, run.signals) if got is None else got
    if got:
        raise guards.Interrupted(got, run.state.step, latest_checkpoint(run.out))


def _conclude(run: _Run, on_end, progress: bool = False) -> dict:
    """The result, the stop rate, the task metric (`on_end`), OUT/model and OUT/result.json."""
    acc = run.acc
    _stop_if_signalled(run)  # the last step is saved: a resumed run concludes
    result = _result(run.state, run.holdout, run.data_cfg)
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
        result["metric"] = on_end(acc.unwrap_model(run.model), run.holdout)
    if acc.is_main_process:
        save_model(run.out / "model", acc.unwrap_model(run.model), run.tok, run.data_cfg, run.cfg, full, run.say)
        atomic_write_text(run.out / "result.json", json.dumps(result, indent=2))
    return result


def _stop_rate(run: _Run, one_device: bool, progress: bool) -> dict:
    """evaluation.run_stop_rate of the trained model, said in one line and logged to OUT/log.jsonl."""
    from . import evaluation

    if not one_device:
        res = {"prompts": 0, "error": "not measured in a sharded multi-process run; measure OUT/model on one device"}
    else:
        res = evaluation.run_stop_rate(run.acc.unwrap_model(run.model), run.tok, run.holdout.val, run.data_cfg,
                                       run.cfg, progress)
    run.say(evaluation.describe(res))
    log_step(run.out, {"step": run.state.step, **{k: res[k] for k in evaluation.LOGGED if k in res}}, None)
    return res


def _result(state: LoopState, holdout: Holdout, data_cfg: DataConfig) -> dict:
    """result.json (less the stop rate and the metric); val_row_losses: [loss sum, tokens] per validation row."""
    losses = [e["val_loss"] for e in state.evals]
    return {"train_on": data_cfg.train_on, "steps": state.step, "final_val_loss": losses[-1] if losses else None,
            "best_val_loss": min(losses, default=None), "evals": state.evals,
            "train_losses": [h["train_loss"] for h in state.history], "trained_tokens": state.trained_tokens,
            "input_tokens": state.input_tokens, "train_seconds": state.seconds, "val_tokens": holdout.val_tokens,
            "val_tokens_sha256": holdout.val_sha256, "train_rows": len(holdout.train), "val_rows": len(holdout.val),
            "val_row_losses": state.val_row_losses}
