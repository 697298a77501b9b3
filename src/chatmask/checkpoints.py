"""Checkpoints of a training run: `save_checkpoint` writes OUT/checkpoints/step-N atomically (trainable
weights as safetensors, optimizer, scheduler and every RNG: CPU, each GPU, Python's), `load_checkpoint`
restores them with
`torch.load(weights_only=True)`; FSDP / DeepSpeed runs go through accelerate's `save_state`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .errors import ConfigError


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model, opt, sched, state: dict, keep: int) -> Path:
    """Write OUT/checkpoints/step-N atomically (a temporary folder renamed when complete)."""
    from safetensors.torch import save_file

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable(model), str(tmp / "weights.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "python_random": random.getstate()}, default=list))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_states() -> dict:
    """Every torch random generator a training step can draw from (dropout, LoRA dropout): the CPU one and,
    where CUDA is in use, each GPU's. Python's `random` goes in state.json."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        if not torch.cuda.is_available():
            raise ConfigError("this checkpoint holds GPU random states but no GPU is available; resume it on a GPU")
        torch.cuda.set_rng_state_all(states["cuda"])


def is_sharded(acc) -> bool:
    return "FSDP" in str(acc.distributed_type) or "DEEPSPEED" in str(acc.distributed_type)


def save_sharded(acc, out: Path, state: dict, keep: int) -> None:
    """FSDP / DeepSpeed: weights and optimizer are sharded across processes, so accelerate writes them
    (every process takes part); the loop state goes beside them. accelerate runs FSDP only on GPUs:
    tests/test_gpu.py resumes an FSDP run from these and gets the uninterrupted loss curve."""
    final = out / "checkpoints" / f"step-{state['step']:06d}"
    acc.save_state(str(final / "accelerate"))
    if acc.is_main_process:
        (final / "state.json").write_text(json.dumps({**state, "python_random": random.getstate()}, default=list))
        root = out / "checkpoints"
        for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model, opt, sched) -> dict:
    """Restore weights, optimizer, scheduler and RNG; torch files are read with weights_only=True."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ConfigError(f"{path}: checkpoint does not fit this model (e.g. {missing[0]}); was it made with other options?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_states(torch.load(path / "rng.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    pr = state.pop("python_random")
    random.setstate((pr[0], tuple(pr[1]), pr[2]))
    return state
