"""The post's experiment as one command: `compare(data, data_cfg, train_cfg, cmp_cfg, out)`.

Arm `masked` trains on assistant tokens (train_on=assistant), arm `unmasked` on every token
(train_on=all); everything else is identical (seed, data order, steps, hyperparameters), K seeds each.
Every arm is evaluated on the same assistant-only validation tokens (checked by count and hash). Each
run writes its result when it ends and resumes from its checkpoints, so a study can finish in parts.
Outputs: loss.png / loss.svg, report.md, report.html, metrics.json.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from . import config
from .config import ARMS, CompareConfig, DataConfig, TrainConfig
from .errors import ConfigError
from .train import train


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _metric_conversations(data: str, data_cfg: DataConfig, cmp: CompareConfig, val_sources: set[str] | None):
    from . import conversations

    src = cmp.metric_data or data
    out = []
    for c in conversations.load(src, format=data_cfg.format, salvage=data_cfg.salvage, skip_invalid=True,
                                split=data_cfg.split):
        if cmp.metric_data or (val_sources and c.source in val_sources):
            out.append(c.messages)
    return out


def compare(data: str, data_cfg: DataConfig, train_cfg: TrainConfig, cmp: CompareConfig, out, *, tokenizer=None,
            model_factory=None, log=print, command: str | None = None) -> dict:
    """Run every arm x seed (skipping runs already finished), then write the report. `model_factory`:
    a callable returning a fresh model (tests); default: load `train_cfg.model` for each run."""
    from .hub import data_tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda *a: None)
    tok = data_tokenizer(data_cfg, train_cfg.model, tokenizer, trust_remote_code=train_cfg.trust_remote_code)
    arms = cmp.arms.split(",")
    runs = {}
    for seed in range(cmp.seeds):
        for arm in arms:
            rdir = out / "runs" / f"{arm}-seed{seed}"
            done = rdir / "result.json"
            tc = config.replace(train_cfg, seed=train_cfg.seed + seed, resume=True)
            dc = config.replace(data_cfg, train_on=ARMS[arm])
            if done.exists():
                _check_reuse(rdir, dc, tc)
                runs[(arm, seed)] = json.loads(done.read_text())
                say(f"{arm} seed {seed}: already finished ({done})")
                continue
            say(f"{arm} seed {seed}: training ({ARMS[arm]} tokens)")
            t0 = time.perf_counter()
            hook = _metric_hook(data, data_cfg, cmp, tok) if cmp.metric != "none" else None
            res = train(data, dc, tc, rdir, tokenizer=tok, model=model_factory() if model_factory else None,
                        log=say, on_end=hook)
            res["wall_seconds"] = time.perf_counter() - t0
            done.write_text(json.dumps(res, indent=2))
            runs[(arm, seed)] = res
    return write_report(out, data, data_cfg, train_cfg, cmp, runs, tok, command)


def _check_reuse(rdir: Path, dc: DataConfig, tc: TrainConfig) -> None:
    """A finished run is reused only if it was made with these settings: a rerun of compare with another
    --lr into the same folder would otherwise report the old runs as the new ones."""
    try:
        saved = json.loads((rdir / "config.json").read_text())
    except (OSError, ValueError):
        return  # a run from before config.json was written: nothing to compare against
    unsafe, _ = config.run_changes(saved, dc, tc)
    if unsafe:
        raise ConfigError(f"{rdir} finished with other settings: {config.describe_changes(unsafe)}; pass another "
                          "--out for these settings, or delete that folder to redo it")


def _metric_hook(data, data_cfg, cmp, tok):
    def run(model, split):
        from . import metrics

        sources = set(split.val["source"]) if not cmp.metric_data else None
        convs = _metric_conversations(data, data_cfg, cmp, sources)
        if not convs:
            return {"error": "no conversations for the metric"}
        return metrics.ner_f1(model, tok, convs, template=data_cfg.template, max_questions=cmp.metric_questions,
                              progress=True)

    return run


def write_report(out: Path, data, data_cfg, train_cfg, cmp, runs: dict, tok, command) -> dict:
    arms = cmp.arms.split(",")
    hashes = {(a, s): (r["val_tokens"], r["val_tokens_sha256"]) for (a, s), r in runs.items()}
    if len(set(hashes.values())) != 1:
        raise ConfigError(f"the runs scored different validation tokens: {hashes}; were they made with other data or "
                          "options? delete the runs folder to start over")
    summary = {}
    for arm in arms:
        rs = [runs[(arm, s)] for s in range(cmp.seeds)]
        fin, fin_sd = _mean_std([r["final_val_loss"] for r in rs])
        best, best_sd = _mean_std([r["best_val_loss"] for r in rs])
        f1, f1_sd = _mean_std([(r.get("metric") or {}).get("f1") for r in rs])
        summary[arm] = {
            "train_on": ARMS[arm], "seeds": cmp.seeds,
            "final_val_loss_mean": fin, "final_val_loss_std": fin_sd,
            "best_val_loss_mean": best, "best_val_loss_std": best_sd,
            "f1_mean": f1, "f1_std": f1_sd,
            "trained_tokens": statistics.fmean(r["trained_tokens"] for r in rs),
            "input_tokens": statistics.fmean(r["input_tokens"] for r in rs),
            "trained_fraction": statistics.fmean(r["trained_tokens"] / max(r["input_tokens"], 1) for r in rs),
            "wall_seconds_mean": statistics.fmean(r.get("wall_seconds", r["train_seconds"]) for r in rs),
            "val_tokens": rs[0]["val_tokens"], "val_tokens_sha256": rs[0]["val_tokens_sha256"],
            "per_seed": [{"seed": s, "final_val_loss": r["final_val_loss"], "best_val_loss": r["best_val_loss"],
                          "evals": r["evals"], "metric": r.get("metric")} for s, r in enumerate(rs)],
        }
    from .prepare import role_tokens

    roles = role_tokens(data, config.replace(data_cfg, train_on="assistant"), tok, max_rows=cmp.role_rows)
    result = {"data": str(data), "command": command or shlex.join(sys.argv), "data_stats": roles,
              "data_config": config.to_dict(data_cfg), "train_config": config.to_dict(train_cfg),
              "compare_config": config.to_dict(cmp), **summary}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _plot(out, summary, arms)
    from .report import report_html, report_markdown

    (out / "report.md").write_text(report_markdown(result, arms))
    (out / "report.html").write_text(report_html(result, arms, (out / "loss.svg").read_text()))
    return result


def _plot(out: Path, summary: dict, arms) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"masked": "#1f77b4", "unmasked": "#d62728"}
    for arm in arms:
        curves = [s["evals"] for s in summary[arm]["per_seed"]]
        steps = [e["step"] for e in curves[0]]
        vals = [[e["val_loss"] for e in c] for c in curves]
        mean = [statistics.fmean(v) for v in zip(*vals)]
        lo = [min(v) for v in zip(*vals)]
        hi = [max(v) for v in zip(*vals)]
        label = f"{arm} (train_on={ARMS[arm]})" + (f", {len(curves)} seeds" if len(curves) > 1 else "")
        ax.plot(steps, mean, marker="o", ms=3, color=colors.get(arm), label=label)
        if len(curves) > 1:
            ax.fill_between(steps, lo, hi, color=colors.get(arm), alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (assistant tokens only)")
    ax.set_title("masked vs unmasked: the same assistant-only validation tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    fig.savefig(out / "loss.svg")
    plt.close(fig)
