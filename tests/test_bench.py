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
