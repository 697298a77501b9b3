"""Two processes on CPU (gloo) through torchrun and accelerate launch: each sees its shard, the loss is
normalised by the global trained-token count, and the curve equals one process with the same global
batch. Tolerance 1e-5: the two runs sum the same numbers in a different order (per-rank partial sums,
then a gloo all-reduce), about 1e-7 relative per reduction in fp32, amplified a little by a few AdamW
steps; any sharding or normalisation error is orders of magnitude larger (>1e-2 here)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_compare import NER, tiny_factory

pytestmark = pytest.mark.slow


@pytest.fixture()
def setup(tmp_path, bpe_tok):
    d = tmp_path / "tiny"
    tiny_factory(bpe_tok)().save_pretrained(d)
    bpe_tok.save_pretrained(d)
    data = tmp_path / "ner.json"
    data.write_text(json.dumps(NER))
    env = {**os.environ, "CHATMASK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(d), "--finetune", "full", "--lr", "0.002", "--steps", "6", "--eval-every", "3",
              "--save-every", "3", "--val-split", "0.2", "--no-tensorboard"]
    return str(data), env, common


def _result(path):
    return json.loads((path / "result.json").read_text())


def _run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_equal_one(setup, tmp_path):
    data, env, common = setup
    one_process = [sys.executable, "-m", "chatmask", "train", data, *common, "--batch-size", "4"]
    _run([*one_process, "--out", str(tmp_path / "one")], env)
    torchrun = shutil.which("torchrun") or pytest.skip("no torchrun")
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "chatmask", "train", data, *common,
          "--batch-size", "2", "--out", str(tmp_path / "two")], env)
    one, two = _result(tmp_path / "one"), _result(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2
    assert two["trained_tokens"] == one["trained_tokens"] and two["val_tokens_sha256"] == one["val_tokens_sha256"]
    assert two["train_losses"] == pytest.approx(one["train_losses"], abs=1e-5)
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)
    # checkpoints were written once, and a 2-process run resumes from them
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-000006")
    (tmp_path / "two" / "result.json").unlink()
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29518", "-m", "chatmask", "train", data, *common,
          "--batch-size", "2", "--resume", "--out", str(tmp_path / "two")], env)
    assert _result(tmp_path / "two")["train_losses"] == pytest.approx(one["train_losses"], abs=1e-5)


def test_accelerate_launch(setup, tmp_path):
    data, env, common = setup
    accelerate = shutil.which("accelerate") or pytest.skip("no accelerate launcher")
    # the example config: accelerate's torchrun launcher ("MULTI_GPU"); with no GPU the processes use gloo
    # on CPU (accelerate's --cpu always starts a single process unless MPI is set up)
    cfg = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp_cpu.yaml"
    _run([accelerate, "launch", "--config_file", str(cfg), "--main_process_port", "29519", "-m", "chatmask", "train",
          data, *common, "--batch-size", "2", "--out", str(tmp_path / "acc")], env)
    r = _result(tmp_path / "acc")
    assert r["steps"] == 6 and json.loads((tmp_path / "acc" / "config.json").read_text())["processes"] == 2


def test_two_processes_with_gradient_checkpointing_and_packing_equal_one(setup, tmp_path):
    """--gradient-checkpointing under DDP (non-reentrant, so no 'parameter marked ready twice'), with packing
    and the sparse head: the same curve as one process without checkpointing."""
    data, env, common = setup
    _run([sys.executable, "-m", "chatmask", "train", data, *common, "--packing", "--batch-size", "4",
          "--out", str(tmp_path / "one")], env)
    torchrun = shutil.which("torchrun") or pytest.skip("no torchrun")
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29520", "-m", "chatmask", "train", data, *common,
          "--packing", "--gradient-checkpointing", "--batch-size", "2", "--out", str(tmp_path / "two")], env)
    one, two = _result(tmp_path / "one"), _result(tmp_path / "two")
    assert two["train_losses"] == pytest.approx(one["train_losses"], abs=1e-5)
