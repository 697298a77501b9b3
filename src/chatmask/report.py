"""The comparison report as Markdown and as one self-contained HTML page (plot inlined as SVG).

`report_markdown(result, arms)` / `report_html(result, arms, svg)` read the dict `compare` writes to
metrics.json; every number shown comes from it.
"""

from __future__ import annotations

import html
import json
import os
import re

from .audit import ROLES
from .metrics import MIN_BOOTSTRAP_ITEMS


def _f(x, d=4):
    return "—" if x is None else f"{x:.{d}f}"


def _pm(m, s, d=4, seeds=2):
    """mean ± std; one seed has no std to show (never "± 0.0000")."""
    if m is None:
        return "—"
    return f"{m:.{d}f} ± {s:.{d}f}" if seeds > 1 else f"{m:.{d}f} (1 seed)"


def shown_path(path) -> str:
    """A data path as a reader of the report can use it: relative to the folder the command ran in when
    it is under it, the package's name for a file inside an installed package, else as given."""
    p = str(path)
    if not os.path.isabs(p):
        return p
    parts = p.split(os.sep)
    if "site-packages" in parts:
        i = parts.index("site-packages")
        return f"{parts[i + 1]} (installed package): {os.sep.join(parts[i + 1:])}"
    cwd = os.getcwd()
    return os.path.relpath(p, cwd) if p.startswith(cwd + os.sep) else p


def _code(text: str) -> str:
    """HTML for one line of the Markdown text: escaped, `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _rows(result, arms):
    out = []
    for arm in arms:
        a = result[arm]
        out.append([
            arm, a["train_on"], str(a["seeds"]), f"{a['trained_tokens']:,.0f}", f"{a['trained_fraction']:.1%}",
            _pm(a["final_val_loss_mean"], a["final_val_loss_std"], seeds=a["seeds"]),
            _pm(a["best_val_loss_mean"], a["best_val_loss_std"], seeds=a["seeds"]), f"{a['wall_seconds_mean']:.0f}",
        ])
    return out


HEAD = ["arm", "train_on", "seeds", "trained tokens / run", "trained fraction", "final val loss (mean ± std)",
        "best val loss (mean ± std)", "wall s / run"]

SET_TITLES = {"heldout": "held-out rows of the training domains", "unseen": "the --metric-data set, never trained on"}
F1_HEAD = ["questions", "arm", "entity F1 (mean ± std over seeds)", "F1, seeds pooled [95% CI]", "precision", "recall",
           "answers that are a JSON list"]


def f1_rows(result, arms) -> list[list[str]]:
    """One row per metric set and arm (F1_HEAD's columns); [] without a metric."""
    out = []
    for name, entry in (result.get("metric") or {}).items():
        for arm in arms:
            a = entry[arm]
            out.append([f"{SET_TITLES.get(name, name)}: {a['questions']} ({a['with_entities']} with entities)", arm,
                        _pm(a["f1_mean"], a["f1_std"], 3, seeds=result[arm]["seeds"]),
                        f"{a['f1_pooled']:.3f} [{a['f1_ci95'][0]:.3f}, {a['f1_ci95'][1]:.3f}]",
                        f"{a['precision']:.3f}", f"{a['recall']:.3f}", f"{a['parsed_fraction']:.0%}"])
    return out


def f1_verdict(result, arms) -> str:
    """What the entity F1 says, set by set: the paired difference and whether it is beyond noise; why an
    F1 of 0 says nothing."""
    texts = []
    for name, entry in (result.get("metric") or {}).items():
        where = SET_TITLES.get(name, name)
        if max(entry[a]["f1_pooled"] for a in arms) < 0.005:
            texts.append(f"Entity F1 on {where} is 0: no run named a gold entity (the runs predicted "
                         f"{sum(entry[a]['predicted'] for a in arms)} entities in all; the models answer an empty "
                         "list or text that is not a JSON list, see the answers below), so at this training budget "
                         "the metric does not separate the arms; more steps, full fine-tuning or a higher learning "
                         "rate do.")
            continue
        if "difference_ci95" not in entry:
            continue
        first, second = arms[0], arms[1]
        d = entry[first]["f1_pooled"] - entry[second]["f1_pooled"]
        lo, hi = entry["difference_ci95"]
        beyond = lo > 0 or hi < 0
        n = entry[first]["questions"]
        text = (f"Entity F1 on {where}: {first} {entry[first]['f1_pooled']:.3f}, {second} "
                f"{entry[second]['f1_pooled']:.3f}; {first} - {second} = {d:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] "
                f"(paired bootstrap over the {n} questions, seeds pooled): "
                + ("the arms differ beyond this noise." if beyond else
                   "the interval holds 0, so the arms do not differ beyond this noise."))
        pairs = list(zip(*([s["metric"][name]["f1"] for s in result[a]["per_seed"]] for a in (first, second))))
        if len(pairs) > 1:  # the interval above does not see seed-to-seed noise; say it seed by seed
            wins = sum(a > b for a, b in pairs)
            text += (f" Seed by seed, {first} scored higher in {wins} of {len(pairs)} seeds ("
                     + ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in pairs) + ").")
        texts.append(text)
    return " ".join(texts)



STOP_HEAD = ["arm", "prompts", "stopped", "ran into a header", "ran on to the limit",
             "answer tokens (mean) vs reference"]


def _share(m, sd, seeds):
    return f"{m:.0%}" + (f" ± {sd:.0%}" if seeds > 1 and sd is not None else "")


def stop_rows(result, arms) -> list[list[str]]:
    """One row per arm (STOP_HEAD's columns) from each arm's `stop`; [] when no arm has one measured."""
    out = []
    for arm in arms:
        st = result[arm].get("stop") or {}
        if "stop_rate_mean" not in st:
            continue
        seeds = result[arm]["seeds"]
        out.append([arm, str(st["prompts"]), _share(st["stop_rate_mean"], st.get("stop_rate_std"), seeds),
                    f"{st['header_rate_mean']:.0%}", f"{st['ran_on_rate_mean']:.0%}",
                    f"{st['mean_new_tokens']:.1f} vs {st['mean_reference_tokens']:.1f}"])
    return out


def stop_text(result, arms) -> str:
    """What the stop rate counts, in one paragraph (or why it is missing)."""
    sts = [result[a].get("stop") or {} for a in arms]
    st = next((x for x in sts if "stop_rate_mean" in x), None)
    if st is None:
        why = next((x["error"] for x in sts if "error" in x), None)
        return f"Not measured: {why}." if why else ""
    stops = " / ".join(f"`{x}`" for x in st.get("stops") or []) or "a trained stop"
    text = (f"Greedy answers to the first {st['prompts']} validation prompts whose trained answer fits in "
            f"{st['max_new_tokens']} tokens (the same prompts for every run): *stopped* ends with {stops} within "
            f"{st['max_new_tokens']} tokens, *ran into a header* wrote the next message's header before any stop, "
            f"*ran on* reached the limit; shares are means over seeds.")
    warn = next((x["warning"] for x in sts if "warning" in x), None)
    return text + (f" Note: {warn}." if warn else "")


def stop_markdown(result, arms) -> list[str]:
    """The stop-rate table and what it counts, as Markdown lines; [] when it was not asked for."""
    rows, text = stop_rows(result, arms), stop_text(result, arms)
    if not rows and not text:
        return []
    table = (["| " + " | ".join(STOP_HEAD) + " |", "|" + "---|" * len(STOP_HEAD)]
             + ["| " + " | ".join(r) + " |" for r in rows] + [""]) if rows else []
    return ["## Stop rate (does the model end its answer where it was trained to?)", ""] + table + [text, ""]


def _stop_html(result, arms) -> str:
    rows, text = stop_rows(result, arms), stop_text(result, arms)
    if not rows and not text:
        return ""
    e = html.escape
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in STOP_HEAD) + f"</tr>{body}</table>") if rows else ""
    return (f"<h2>Stop rate (does the model end its answer where it was trained to?)</h2>{table}"
            f"<p>{_code(text).replace('*', '')}</p>")


def _stats_lines(result):
    s = result["data_stats"]
    roles = ROLES
    total = sum(s[k] for k in roles) or 1
    ua = s.get("user_to_assistant")
    lines = [
        f"data: `{shown_path(result['data'])}` (tokens by role over its first {s['rows']:,} rows kept)",
        "tokens by role: " + ", ".join(f"{k} {s[k]:,} ({s[k] / total:.1%})" for k in roles),
        f"user : assistant tokens = {ua:.2f} : 1" if ua is not None else "user : assistant: no assistant tokens",
    ]
    first = result[next(a for a in ("masked", "unmasked") if a in result)]
    lines.append(f"validation: {first['val_tokens']:,} assistant tokens, the same for every run "
                 f"(sha256 {first['val_tokens_sha256'][:16]}…)")
    return lines


def _verdict(result, arms):
    if not {"masked", "unmasked"} <= set(arms):
        return "Only one arm was run; nothing to compare."
    m, u = result["masked"], result["unmasked"]
    dm, du = m["final_val_loss_mean"], u["final_val_loss_mean"]
    diff = du - dm
    spread = max(m["final_val_loss_std"], u["final_val_loss_std"])
    seeds = m["seeds"]
    if seeds < 2:
        strength = "one seed per arm, so there is no estimate of run-to-run noise"
    elif abs(diff) > 2 * spread:
        strength = f"larger than twice the larger seed std ({spread:.4f}) over {seeds} seeds"
    else:
        strength = f"within twice the larger seed std ({spread:.4f}) over {seeds} seeds: not distinguishable from noise"
    better = "masked" if diff > 0 else "unmasked"
    text = (f"Final assistant-only validation loss: masked {dm:.4f}, unmasked {du:.4f}; {better} is lower by "
            f"{abs(diff):.4f} ({strength}).")
    ci = result.get("val_loss_difference_ci95")
    if not ci and m.get("val_rows") and m["val_rows"] < MIN_BOOTSTRAP_ITEMS:
        text += (f" The {m['val_rows']} validation rows are too few for an interval over rows (at least "
                 f"{MIN_BOOTSTRAP_ITEMS}: raise --val-rows or --val-split).")
    if ci:
        lo, hi = ci
        rows = m.get("val_rows")
        text += (f" Over validation rows: masked - unmasked = {-diff:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] (paired "
                 f"bootstrap over the {rows if rows else 'validation'} rows" + (", seeds pooled" if seeds > 1 else "")
                 + "): " + ("the difference is beyond the noise of which rows were drawn." if lo > 0 or hi < 0 else
                            "the interval holds 0, so the difference is within the noise of which rows were drawn."))
    text += (" This is one dataset, one model and one training budget; it does not show the effect at other "
             "sizes, budgets or data.")
    return text


def answers_side_by_side(result: dict, arms) -> list[dict]:
    """Seed 0's metric questions (the unseen set when there is one) with the gold answer and each arm's
    generation (from the metric's examples): [{passage, type, gold, <arm>: raw answer}], [] without a metric."""
    name = next((n for n in ("unseen", "heldout") if n in (result.get("metric") or {})), None)
    if name is None:
        return []
    per_arm = {a: ((result[a]["per_seed"][0].get("metric") or {}).get(name) or {}).get("examples") or [] for a in arms}
    n = min((len(v) for v in per_arm.values()), default=0)
    out = []
    for k in range(n):
        first = per_arm[arms[0]][k]
        row = {"passage": first.get("passage", ""), "type": first["type"], "gold": json.dumps(first["gold"])}
        row.update({a: per_arm[a][k]["raw"].strip() for a in arms})
        out.append(row)
    return out


def f1_markdown(result, arms) -> list[str]:
    """The entity F1 table and what it says, as Markdown lines; [] without a metric."""
    rows = f1_rows(result, arms)
    if not rows:
        why = _metric_error(result, arms)
        return ["## Entity F1 (greedy answers)", "", f"Not computed: {why}.", ""] if why else []
    return (["## Entity F1 (greedy answers)", "", "| " + " | ".join(F1_HEAD) + " |", "|" + "---|" * len(F1_HEAD)]
            + ["| " + " | ".join(r) + " |" for r in rows] + ["", f1_verdict(result, arms), ""]
            + ([fewer_questions(result), ""] if fewer_questions(result) else []))


def answers_markdown(result, arms) -> list[str]:
    """`answers_side_by_side` as a Markdown table; [] without a metric."""
    side = answers_side_by_side(result, arms)
    if not side:
        return []
    return (["## Answers side by side (seed 0, held-out questions)", "",
             "| passage (start) | question: what describes… | gold | " + " | ".join(arms) + " |",
             "|" + "---|" * (3 + len(arms))]
            + ["| " + " | ".join(_md_cell(x) for x in [r["passage"], r["type"], r["gold"], *(r[a] for a in arms)])
               + " |" for r in side] + [""])


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def report_markdown(result: dict, arms) -> str:
    lines = ["# chatmask compare: masked vs unmasked", "", "![validation loss](loss.png)", ""]
    lines += [f"- {x}" for x in _stats_lines(result)]
    lines += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(result, arms)]
    lines += ["", _verdict(result, arms), ""]
    lines += stop_markdown(result, arms)
    lines += f1_markdown(result, arms)
    lines += answers_markdown(result, arms)
    lines += ["## Per seed", ""]
    for arm in arms:
        for s in result[arm]["per_seed"]:
            f1s = {n: m["f1"] for n, m in (s.get("metric") or {}).items() if isinstance(m, dict) and "f1" in m}
            st = s.get("stop") or {}
            lines.append(f"- {arm} seed {s['seed']}: final {_f(s['final_val_loss'])}, best {_f(s['best_val_loss'])}"
                         + (f", stopped {st['stopped']}/{st['prompts']}" if st.get("prompts") else "")
                         + "".join(f", F1 {n} {f:.3f}" for n, f in f1s.items()))
    configs = {k: result[k] for k in ("data_config", "train_config", "compare_config")}
    lines += ["", "## How it was made", "", "```", result["command"], "```", "", "```json",
              json.dumps(configs, indent=2), "```", ""]
    return "\n".join(lines)


def _answers_html(result: dict, arms) -> str:
    side = answers_side_by_side(result, arms)
    if not side:
        return ""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in ["passage (start)", "question: what describes…", "gold", *arms])
    cells = ([r["passage"], r["type"], r["gold"], *(r[a] for a in arms)] for r in side)
    rows = "".join("<tr>" + "".join(f"<td>{e(str(x)) or '(empty)'}</td>" for x in c) + "</tr>" for c in cells)
    return f"<h2>Answers side by side (seed 0, held-out questions)</h2><table><tr>{head}</tr>{rows}</table>"


def _metric_error(result, arms) -> str | None:
    """Why a task metric that was asked for is missing (the summary's or a run's `metric.error`), else None."""
    return result.get("metric_error") or next((s["metric"]["error"] for a in arms for s in result[a]["per_seed"]
                                               if isinstance(s.get("metric"), dict) and "error" in s["metric"]), None)


def fewer_questions(result) -> str:
    """Where a metric set scored fewer questions than asked for, how many and why (compare's metric plan)."""
    return " ".join(f"{SET_TITLES.get(n, n).capitalize()}: {p['scored']} of the {p['asked']} questions asked for "
                    f"were scored: {p['why']}." for n, p in (result.get("metric_plan") or {}).items() if p.get("why"))


def _f1_html(result, arms) -> str:
    rows = f1_rows(result, arms)
    if not rows:
        why = _metric_error(result, arms)
        return f"<h2>Entity F1 (greedy answers)</h2><p>Not computed: {_code(why)}.</p>" if why else ""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in F1_HEAD)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<h2>Entity F1 (greedy answers)</h2><table><tr>{head}</tr>{body}</table>"
            f"<p>{_code(f1_verdict(result, arms))}</p>"
            + (f"<p>{_code(fewer_questions(result))}</p>" if fewer_questions(result) else ""))


def report_html(result: dict, arms, svg: str) -> str:
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in _rows(result, arms))
    stats = "".join(f"<li>{_code(x)}</li>" for x in _stats_lines(result))
    svg = svg[svg.find("<svg"):]
    conf = e(json.dumps({k: result[k] for k in ("data_config", "train_config", "compare_config")}, indent=2))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>chatmask compare</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}th{background:#f4f4f4}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}svg{max-width:100%;height:auto}</style></head><body>"
        f"<h1>chatmask compare: masked vs unmasked</h1>{svg}<ul>{stats}</ul>"
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEAD) + f"</tr>{rows}</table>"
        f"<p>{_code(_verdict(result, arms))}</p>{_stop_html(result, arms)}{_f1_html(result, arms)}"
        f"{_answers_html(result, arms)}<h2>How it was made</h2><pre>{e(result['command'])}</pre><pre>{conf}</pre>"
        "</body></html>"
    )
