"""The post's experiment as one command: `compare(data, data_cfg, train_cfg, cmp_cfg, out)`.

Arm `masked` trains on assistant tokens (train_on=assistant), arm `unmasked` on every token
(train_on=all); everything else is identical (seed, data order, steps, hyperparameters), K seeds each.
The work every run shares is done once: the data is prepared once (assistant labels; each run applies its
train_on) and every run trains on that folder, and the metric's question sets are built once. Every arm is
evaluated on the same assistant-only validation tokens (checked by count and hash). Each run writes its
result when it ends and resumes from its checkpoints, so a study can finish in parts.
Outputs: loss.png / loss.svg, report.md, report.html, metrics.json.
"""

from __future__ import annotations

import io
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from . import checkpoints, config, memory
from .config import ARMS, CompareConfig, DataConfig, TrainConfig
from .errors import ConfigError
from .paths import atomic_write_bytes, atomic_write_text
from .train import train


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


METRIC_SETS = ("heldout", "unseen")  # the validation rows' questions; --metric-data's


class QuestionSets:
    """The task metric's questions, read and picked once per experiment: {set name: questions} with
    `heldout`, the NER questions of the validation rows (from --val-data when given), and `unseen`,
    --metric-data's, when given; a set without NER questions is left out. Every run holds out the same
    rows (the report checks their hash), so the first run's ask builds them and the others reuse them."""

    def __init__(self, data: str, data_cfg: DataConfig, train_cfg: TrainConfig, cmp: CompareConfig):
        self.data, self.data_cfg, self.train_cfg, self.cmp = data, data_cfg, train_cfg, cmp
        self._heldout: dict[frozenset, list] = {}  # by the validation rows' sources
        self._unseen: list | None = None
        self.found: dict[str, tuple[int, int]] = {}  # set name -> (questions found, how many with a gold entity)

    def _questions(self, name: str, path: str, keep=lambda source: True) -> list:
        from . import conversations, metrics

        c = self.data_cfg
        convs = [conv.messages for conv in conversations.load(path, format=c.format, salvage=c.salvage,
                                                              skip_invalid=True, split=c.split) if keep(conv.source)]
        found = metrics.ner_questions(convs)
        self.found[name] = (len(found), sum(bool(g) for _, _, g in found))
        return metrics.pick_questions(found, self.cmp.metric_questions, with_entities=self.cmp.metric_with_entities)

    def get(self, val_sources) -> dict[str, list]:
        key = frozenset(val_sources)
        if key not in self._heldout:
            self._heldout[key] = self._questions("heldout", self.train_cfg.val_data or self.data, key.__contains__)
        if self._unseen is None and self.cmp.metric_data:
            self._unseen = self._questions("unseen", self.cmp.metric_data)
        return {k: v for k, v in (("heldout", self._heldout[key]), ("unseen", self._unseen)) if v}


def compare(data: str, data_cfg: DataConfig, train_cfg: TrainConfig, cmp: CompareConfig, out, *, tokenizer=None,
            model_factory=None, log=print, command: str | None = None) -> dict:
    """Run every arm x seed (skipping runs already finished), then write the report. `model_factory`:
    a callable returning a fresh model (tests); default: load `train_cfg.model` for each run."""
    from .hub import data_tokenizer
    from .prepare import prepare_cached, with_stops

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda *a: None)
    tok = data_tokenizer(data_cfg, train_cfg.model, tokenizer, trust_remote_code=train_cfg.trust_remote_code)
    labelled = with_stops(data_cfg, tok)  # the stop list named once: what the rows are labelled with
    prepared = prepare_cached(data, config.replace(labelled, train_on="assistant"), tok, log=say)
    questions = QuestionSets(data, labelled, train_cfg, cmp) if cmp.metric != "none" else None
    plan = _metric_plan(questions, prepared, labelled, train_cfg, cmp, tok, say) if questions else {}
    hook = _metric_hook(questions, labelled, train_cfg, cmp, tok) if questions else None
    runs = {}
    base = None  # step 0's validation loss: every run starts from the loaded model (LoRA's B is zero)
    for seed in range(cmp.seeds):
        for arm in cmp.arms.split(","):
            rdir = out / "runs" / f"{arm}-seed{seed}"
            done = rdir / "result.json"
            tc = config.replace(train_cfg, seed=train_cfg.seed + seed, resume=True)
            dc = config.replace(labelled, train_on=ARMS[arm])
            if done.exists():
                _check_reuse(rdir, str(prepared.path), dc, tc)
                res = json.loads(done.read_text())
                _check_metric_reuse(rdir, res, cmp)
                runs[(arm, seed)] = res
                base = base or _step0(res)
                say(f"{arm} seed {seed}: already finished ({done})")
                continue
            say(f"{arm} seed {seed}: training ({ARMS[arm]} tokens)")
            t0 = time.perf_counter()
            res = train(str(prepared.path), dc, tc, rdir, tokenizer=tok,
                        model=model_factory() if model_factory else None, log=say, on_end=hook, base_eval=base)
            memory.release()  # the next arm starts where this one did
            res["wall_seconds"] = time.perf_counter() - t0
            res["metric_config"] = _metric_config(cmp)
            atomic_write_text(done, json.dumps(res, indent=2))
            runs[(arm, seed)] = res
            base = base or _step0(res)
    return write_report(out, data, data_cfg, train_cfg, cmp, runs, prepared.stats, command, plan)


def _metric_plan(questions: QuestionSets, prepared, data_cfg, train_cfg, cmp, tok, say) -> dict:
    """Before any training: the questions each metric set will score (of the validation rows every run holds
    out, and --metric-data's), said where fewer than asked for; nothing with a gold entity to score is a
    ConfigError naming the flags that give more. {set: {asked, found, found_with_entities, scored, why}}."""
    from .evaluation import hold_out
    from .prepare import prepare_cached

    val = prepare_cached(train_cfg.val_data, config.replace(data_cfg, train_on="assistant"), tok,
                         log=None).dataset() if train_cfg.val_data else None
    sources = hold_out(prepared.dataset(), train_cfg, val).val["source"]
    sets = questions.get(sources)
    where = {"heldout": "--val-data's rows" if train_cfg.val_data else
             f"the {len(sources)} validation rows (--val-split {train_cfg.val_split:g}"
             + (f", --val-rows {train_cfg.val_rows}" if train_cfg.val_rows == len(sources) else "") + ")",
             "unseen": f"--metric-data {cmp.metric_data}"}
    plan = {}
    for name in ("heldout", "unseen") if cmp.metric_data else ("heldout",):
        found, pos = questions.found.get(name, (0, 0))
        qs = sets.get(name, [])
        scored, asked = len(qs), cmp.metric_questions
        why = "" if asked is None or scored >= asked else (
            f"{where[name]} hold {found} `What describes <type> in the text?` questions, {pos} with a gold entity, "
            f"and --metric-with-entities {cmp.metric_with_entities:g} keeps that share with one")
        plan[name] = {"asked": asked, "found": found, "found_with_entities": pos, "scored": scored,
                      "scored_with_entities": sum(bool(g) for _, _, g in qs), "why": why}
        if why:
            say(f"--metric {cmp.metric}: {scored} of the {asked} questions asked for: {why}")
    if not any(p["scored_with_entities"] for p in plan.values()):
        told = "; ".join(f"{where[n]} hold {p['found']}, {p['found_with_entities']} with a gold entity"
                         for n, p in plan.items())
        raise ConfigError(f"--metric {cmp.metric} has no question with a gold entity to score ({told}); raise "
                          "--val-split (or --val-rows), pass --metric-data FILE with such questions, raise "
                          "--metric-questions or --metric-with-entities, or pass --metric none")
    return plan


def _step0(res: dict) -> dict | None:
    """A finished run's step-0 validation loss, for the next runs to take instead of scoring it again."""
    first = (res.get("evals") or [{}])[0]
    return {"val_tokens_sha256": res["val_tokens_sha256"], "val_loss": first["val_loss"]} \
        if first.get("step") == 0 else None


def _check_reuse(rdir: Path, prepared: str, dc: DataConfig, tc: TrainConfig) -> None:
    """A finished run is reused only if it was made with these settings, by the rule resume keeps
    (checkpoints.changed_settings: the data, its labelling, the training): a rerun of compare on another file
    or with another --lr or --max-length into the same folder would otherwise report the old runs as new."""
    from .checkpoints import changed_settings

    try:
        saved = json.loads((rdir / "config.json").read_text())
    except (OSError, ValueError):
        return  # a run from before config.json was written: nothing to compare against
    unsafe, _ = changed_settings(saved, prepared, dc, tc)
    if unsafe:
        raise ConfigError(f"{rdir} finished with other settings: {checkpoints.describe_changes(unsafe)}; pass another "
                          "--out for these settings, or delete that folder to redo it")


def _metric_config(cmp: CompareConfig) -> dict:
    """The settings a run's task metric was computed with (kept in its result.json)."""
    return {k: getattr(cmp, k) for k in ("metric", "metric_data", "metric_questions", "metric_with_entities")}


def _check_metric_reuse(rdir: Path, res: dict, cmp: CompareConfig) -> None:
    saved = res.get("metric_config")
    now = _metric_config(cmp)
    if saved is None or saved == now:
        return
    diff = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
    raise ConfigError(f"{rdir} finished with its metric computed otherwise: {diff}; pass another --out for these "
                      "settings, or delete that folder to redo it")


def _metric_hook(questions: QuestionSets, data_cfg: DataConfig, train_cfg: TrainConfig, cmp: CompareConfig, tok):
    """train's `on_end`: entity F1 of the trained model on each question set."""
    from .hub import stop_tokens

    def run(model, holdout):
        from . import metrics

        sets = questions.get(holdout.val["source"])
        if not sets:
            return {"error": "no `What describes <type> in the text?` questions in the validation rows"
                             + (" or --metric-data" if cmp.metric_data else "")}
        try:  # a metric that fails costs the metric, never the trained run or the report
            return {name: metrics.ner_f1_questions(model, tok, qs, template=data_cfg.template,
                                                   end_of_turn=data_cfg.end_of_turn,
                                                   stop_tokens=stop_tokens(data_cfg, tok),
                                                   batch_size=train_cfg.eval_batch_size, progress=True,
                                                   control_tokens=data_cfg.control_tokens)
                    for name, qs in sets.items()}
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}

    return run


def metric_summary(per_arm: dict[str, list[dict]]) -> dict:
    """{set: {arm: {f1_mean, f1_std, f1_pooled, f1_ci95, precision, recall, parsed_fraction, questions,
    with_entities}, "difference_ci95": [lo, hi]}} from each arm's runs' `metric`. The interval is a
    percentile bootstrap over questions with the seeds pooled; the difference is first arm minus second,
    paired (the arms answer the same questions). Sets missing from any run are left out."""
    from . import metrics

    runs = [r for rs in per_arm.values() for r in rs]
    names = [n for n in METRIC_SETS if runs and all(isinstance((r.get("metric") or {}).get(n), dict) for r in runs)]
    out = {}
    for name in names:
        ms = {a: [r["metric"][name] for r in rs] for a, rs in per_arm.items()}
        asked = {m.get("questions_sha256") for v in ms.values() for m in v}
        if len(asked) > 1:
            raise ConfigError(f"the runs answered different {name} questions (sha256 {sorted(map(str, asked))}); were "
                              "they made with other data? delete the runs folder to start over")
        ci = metrics.bootstrap_f1({a: [m["per_question"] for m in v] for a, v in ms.items()})
        entry = {}
        for a, v in ms.items():
            f1, sd = _mean_std([m["f1"] for m in v])
            pooled = metrics.prf({k: sum(m[k] for m in v) for k in ("tp", "fp", "fn")})
            entry[a] = {"f1_mean": f1, "f1_std": sd, "f1_pooled": pooled["f1"], "f1_ci95": ci[a],
                        "precision": pooled["precision"], "recall": pooled["recall"],
                        "parsed_fraction": statistics.fmean(m["parsed"] / max(m["questions"], 1) for m in v),
                        "predicted": sum(m["tp"] + m["fp"] for m in v),
                        "questions": v[0]["questions"], "with_entities": v[0]["with_entities"]}
        if "difference" in ci:
            entry["difference_ci95"] = ci["difference"]
        out[name] = entry
    return out


def stop_rate_summary(runs: list[dict]) -> dict:
    """One arm's stop rate over its runs' `stop` (evaluation.stop_rate): {stop_rate_mean, stop_rate_std,
    header_rate_mean, ran_on_rate_mean, prompts, mean_new_tokens, mean_reference_tokens, max_new_tokens,
    prompts_sha256}; {"error": why} when a run has none (measured off, or it could not be)."""
    stops = [r.get("stop") for r in runs]
    bad = next((s for s in stops if not isinstance(s, dict) or "error" in s or not s.get("prompts")), False)
    if bad is not False:
        return {"error": bad["error"] if isinstance(bad, dict) and "error" in bad else
                "not measured (--stop-prompts 0, or runs made before chatmask measured it)"}
    mean = lambda k: statistics.fmean(s[k] for s in stops)  # noqa: E731
    rate, rate_sd = _mean_std([s["stop_rate"] for s in stops])
    return {"stop_rate_mean": rate, "stop_rate_std": rate_sd, "header_rate_mean": mean("header_rate"),
            "ran_on_rate_mean": mean("ran_on_rate"), "prompts": stops[0]["prompts"],
            "mean_new_tokens": mean("mean_new_tokens"), "mean_reference_tokens": mean("mean_reference_tokens"),
            "max_new_tokens": stops[0]["max_new_tokens"], "stops": stops[0].get("stops"),
            "prompts_sha256": sorted({s.get("prompts_sha256") for s in stops}, key=str)}


def loss_interval(per_arm: dict[str, list[dict]]) -> dict:
    """{arm: [lo, hi], "difference": [lo, hi]}: 95% intervals of the final assistant-only validation loss
    (seeds pooled) and of first arm minus second, by a paired bootstrap over validation rows (every arm
    scores the same rows); {} when a run has no per-row losses (made before they were kept) or fewer than
    metrics.MIN_BOOTSTRAP_ITEMS rows (a bootstrap over a handful of rows understates the noise)."""
    import numpy as np

    from . import metrics

    tables = {a: [r.get("val_row_losses") for r in rs] for a, rs in per_arm.items()}
    if not tables or any(t is None or len(t) < metrics.MIN_BOOTSTRAP_ITEMS for ts in tables.values() for t in ts):
        return {}
    return metrics.paired_bootstrap({a: sum(np.asarray(t, dtype=float) for t in ts) for a, ts in tables.items()},
                                    metrics.ratio_of)


def _arm_summary(arm: str, rs: list[dict]) -> dict:
    """One arm's entry of metrics.json from its runs (one per seed)."""
    fin, fin_sd = _mean_std([r["final_val_loss"] for r in rs])
    best, best_sd = _mean_std([r["best_val_loss"] for r in rs])
    return {
        "train_on": ARMS[arm], "seeds": len(rs),
        "final_val_loss_mean": fin, "final_val_loss_std": fin_sd,
        "best_val_loss_mean": best, "best_val_loss_std": best_sd,
        "trained_tokens": statistics.fmean(r["trained_tokens"] for r in rs),
        "input_tokens": statistics.fmean(r["input_tokens"] for r in rs),
        "trained_fraction": statistics.fmean(r["trained_tokens"] / max(r["input_tokens"], 1) for r in rs),
        "wall_seconds_mean": statistics.fmean(r.get("wall_seconds", r["train_seconds"]) for r in rs),
        "val_tokens": rs[0]["val_tokens"], "val_tokens_sha256": rs[0]["val_tokens_sha256"],
        "val_rows": rs[0].get("val_rows"),
        "stop": stop_rate_summary(rs),
        "per_seed": [{"seed": s, "final_val_loss": r["final_val_loss"], "best_val_loss": r["best_val_loss"],
                      "evals": r["evals"], "metric": r.get("metric"), "stop": r.get("stop")}
                     for s, r in enumerate(rs)],
    }


def data_stats(stats: dict) -> dict:
    """metrics.json's `data_stats` from the prepared folder's stats.json: tokens by role, the rows counted
    (`rows`) and the user:assistant ratio, the shape the report reads."""
    return {**stats["tokens_by_role"], "rows": stats["tokens_by_role_rows"],
            "user_to_assistant": stats["user_to_assistant"]}


def write_report(out: Path, data, data_cfg, train_cfg, cmp, runs: dict, stats: dict, command,
                 plan: dict | None = None) -> dict:
    """metrics.json, loss.png / loss.svg, report.md and report.html in `out`, each written whole (beside,
    then renamed in); `stats`: the prepared folder's stats.json; `plan`: `_metric_plan`'s questions."""
    arms = cmp.arms.split(",")
    hashes = {(a, s): (r["val_tokens"], r["val_tokens_sha256"]) for (a, s), r in runs.items()}
    if len(set(hashes.values())) != 1:
        raise ConfigError(f"the runs scored different validation tokens: {hashes}; were they made with other data or "
                          "options? delete the runs folder to start over")
    per_arm = {arm: [runs[(arm, s)] for s in range(cmp.seeds)] for arm in arms}
    summary = {arm: _arm_summary(arm, rs) for arm, rs in per_arm.items()}
    asked = {h for arm in arms for h in summary[arm]["stop"].get("prompts_sha256", [])}
    if len(asked) > 1:  # the same validation rows, other --stop-prompts / --stop-max-new-tokens per run
        for arm in arms:
            summary[arm]["stop"]["warning"] = "the runs answered different stop prompts (runs reused from other " \
                                              "--stop-prompts or --stop-max-new-tokens); compare them with care"
    metric, metric_error = {}, None
    try:
        metric = metric_summary(per_arm) if cmp.metric != "none" else {}
    except Exception as e:  # the report still comes, saying why the metric is missing
        metric_error = f"{type(e).__name__}: {e}"
    loss_ci = loss_interval(per_arm)
    for arm in arms:
        summary[arm]["final_val_loss_ci95"] = loss_ci.get(arm)
    result = {"data": str(data), "command": command or shlex.join(sys.argv), "data_stats": data_stats(stats),
              "data_config": config.to_dict(data_cfg), "train_config": config.to_dict(train_cfg),
              "compare_config": config.to_dict(cmp), "metric": metric, "metric_plan": plan or {},
              **({"metric_error": metric_error} if metric_error else {}),
              "val_loss_difference_ci95": loss_ci.get("difference"), **summary}
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    svg = _plot(out, summary, arms)
    from .report import report_html, report_markdown

    atomic_write_text(out / "report.md", report_markdown(result, arms))
    atomic_write_text(out / "report.html", report_html(result, arms, svg))
    return result


def _plot(out: Path, summary: dict, arms) -> str:
    """The validation curves as loss.png and loss.svg in `out`; the SVG's text (report.html embeds it)."""
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
    png, svg = io.BytesIO(), io.StringIO()
    fig.savefig(png, format="png", dpi=120)
    fig.savefig(svg, format="svg")
    plt.close(fig)
    atomic_write_bytes(out / "loss.png", png.getvalue())
    atomic_write_text(out / "loss.svg", svg.getvalue())
    return svg.getvalue()
