"""The benchmarks' own measuring tools: a wrong ruler would make every ratio they print wrong."""

import importlib.util
from pathlib import Path

import torch


def load(name):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tensor_peak_counts_fresh_storage_until_freed_not_views_or_in_place():
    ts = load("train_speed")
    mb = 2**20
    before = torch.ones(mb // 4)  # allocated outside: its views and frees are not the block's
    with ts.tensor_peak() as m:
        a = torch.empty(mb // 4)  # 1 MiB of float32
        a.add_(1)  # in place
        a.view(2, -1).t()  # views
        before[:10].mul_(2)
        b = a * 2  # 1 MiB more
        del b
        c = torch.cat([a, a])  # 2 MiB
        assert m.now == 3 * mb
        del c
    assert m.peak == 3 * mb and m.now == mb
    del a
    assert m.now == 0
    x = torch.nn.Linear(256, 256)
    with ts.tensor_peak() as m:  # autograd: the saved input and the backward's gradients count
        x(torch.randn(64, 256, requires_grad=True)).sum().backward()
    # at the peak: the saved input (64 x 256) and the weight's gradient; after it, .grad of weight and bias live on
    assert m.peak >= (64 + 256) * 256 * 4 and m.now == 256 * 256 * 4 + 256 * 4


def _made_up_results(tm):
    """Child results as `train_memory.run` collects them: MB linear in tokens (slopes known), s a step, one skip."""
    per_1k = {("rows", "default"): 300, ("rows", "checkpointing"): 200, ("rows", "off"): 2000,
              ("one", "default"): 250, ("one", "checkpointing"): 250, ("one", "off"): 1900}
    res = {}
    for (kind, s), mb in per_1k.items():
        for n in tm.SIZES:
            res[(kind, s, n)] = {"mb": 100 + mb * n / 1024, "s": n / 100, "tokens": n}
    res[("rows", "off", 8192)] = {"skipped": tm.skip_reason("off", 8192, 24.0)}
    res[("one", "checkpointing", 2048)] = {"failed": "failed (rc 1)"}
    return res


def test_train_memory_table_slopes_and_summary_on_made_up_results():
    tm = load("train_memory")
    res = _made_up_results(tm)
    table = tm.table_lines(res, tm.SIZES)
    assert len(table) == 2 + len(tm.SIZES)
    assert "512-token rows" in table[0] and "one row of N tokens" in table[0]
    row_4k = next(x for x in table if x.split()[0] == "4096")
    # rows: default, checkpointing, off; then one row: the same, in that order
    words = row_4k.replace("|", " ").split()
    assert [float(v) for v in words[1::4]] == [1300, 900, 8100, 1100, 1100, 7700]
    assert words[3] == "41.0" and words[2::4] == ["MB"] * 6  # s a step, one decimal
    row_8k = next(x for x in table if x.split()[0] == "8192")
    assert "skipped (needs ~22 GB)" in row_8k
    assert "failed (rc 1)" in next(x for x in table if x.split()[0] == "2048")
    slopes = tm.slope_lines(res, tm.SIZES)
    # least squares over the sizes measured: the skipped and the failed point leave the slope exact
    assert slopes[0].endswith("(512-token rows): default 300, checkpointing 200, off 2000")
    assert slopes[1].endswith("(one row of N tokens): default 250, checkpointing 250, off 1900")
    assert tm.summary_line(res) == "memory_mb_per_4k_step=1300"
    del res[tm.SUMMARY]
    assert tm.summary_line(res) == "memory_mb_per_4k_step=nan"


def test_train_memory_slope_is_least_squares_not_end_points():
    tm = load("train_memory")
    # 1 MB a token with one point 1024 MB high at 2k: least squares 1.3 x 1024 - not the end points' 1024
    pts = [(1024, 1024.0), (2048, 3072.0), (4096, 4096.0), (8192, 8192.0)]
    xs = [n for n, _ in pts]
    mx, my = sum(xs) / 4, sum(m for _, m in pts) / 4
    want = 1024 * sum((n - mx) * (m - my) for n, m in pts) / sum((n - mx) ** 2 for n in xs)
    assert abs(tm.slope(pts) - want) < 1e-9 and abs(want - 1024) > 10
    assert tm.slope([(4096, 1.0)]) != tm.slope([(4096, 1.0)])  # one size: NaN


def test_train_memory_skips_a_case_whose_estimate_passes_80_percent_of_available():
    tm = load("train_memory")
    assert abs(tm.estimate_gb("off", 4096) - 11.4) < 1e-9  # 4k in one micro-batch, no recomputation: 10.7 measured
    assert tm.skip_reason("off", 8192, 24.0) == "skipped (needs ~22 GB)"  # 21.8 > 0.8 x 24 = 19.2
    assert tm.skip_reason("off", 8192, 28.0) is None  # 21.8 < 0.8 x 28 = 22.4
    assert tm.skip_reason("off", 4096, 14.0) == "skipped (needs ~11 GB)"  # 11.4 > 11.2
    assert tm.skip_reason("off", 4096, 14.5) is None  # 11.4 < 11.6
    assert tm.skip_reason("default", 8192, 19.0) is None  # the bounded settings need far less
    assert tm.skip_reason("off", 8192, None) is None  # nothing known: run it


def test_train_memory_help_runs_without_a_model():
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / "train_memory.py"
    p = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--quick" in p.stdout and "--sizes" in p.stdout
