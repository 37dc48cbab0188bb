"""Periodic checkpoints of a fine-tuning run, and resuming from the latest one.

``out_dir/checkpoints/step-<N>/`` holds:

* ``trainable.safetensors``: the trainable parameters by name (the chosen blocks, or the LoRA
  adapters), nothing else;
* ``trainer.pt``: optimizer and scheduler state, and the torch RNG states (CPU and the CUDA device);
* ``state.json``: step, epoch and position in that epoch's order, the losses and learning rates so
  far, and the run's identity (the resolved configuration, the fingerprints of the base model and of
  the training data, the pad id). It is written last: a folder without it is incomplete.

A checkpoint folder is written under a temporary name and renamed when complete; only the latest
:data:`KEEP` are kept. A run resumes only from a checkpoint whose identity equals its own
(``save_every`` may differ).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from layerscope.errors import LayerscopeError

from .config import RESUME_FREE_FIELDS

CHECKPOINTS = "checkpoints"
KEEP = 2
STATE = "state.json"
TENSORS = "trainable.safetensors"
TRAINER = "trainer.pt"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, folder)``, oldest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP.match(entry.name)
        if m and entry.is_dir() and (entry / STATE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    out_dir: Path,
    *,
    step: int,
    epoch: int,
    position: int,
    identity: dict,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    losses: list[float],
    lrs: list[float],
    device: torch.device,
) -> Path:
    """Write ``checkpoints/step-<step>/`` and drop all but the latest :data:`KEEP` checkpoints."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in params.items()}
    save_file(tensors, str(tmp / TENSORS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(device)},
        tmp / TRAINER,
    )
    state = {
        "step": step,
        "epoch": epoch,
        "position": position,
        "losses": losses,
        "lrs": lrs,
        "params": list(params),
        "identity": identity,
    }
    (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(out_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    old_cfg, new_cfg = saved.get("config", {}), current["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key in RESUME_FREE_FIELDS:
            continue
        if old_cfg.get(key) != new_cfg.get(key):
            out.append(f"{key}: {old_cfg.get(key)!r} there, {new_cfg.get(key)!r} now")
    if saved.get("base_fingerprint") != current["base_fingerprint"]:
        out.append(
            f"base model fingerprint: {saved.get('base_fingerprint')} there, {current['base_fingerprint']} now"
        )
    if saved.get("data_fingerprint") != current["data_fingerprint"]:
        out.append(
            f"training data fingerprint: {saved.get('data_fingerprint')} there, {current['data_fingerprint']} now"
        )
    if saved.get("pad_id") != current["pad_id"]:
        out.append(f"pad_id: {saved.get('pad_id')} there, {current['pad_id']} now")
    return out


def resumable(out_dir: Path, identity: dict) -> Path | None:
    """The checkpoint to resume from, None to start afresh; refuse a folder that holds another run.

    Starting afresh needs ``out_dir`` absent or empty (an empty or incomplete ``checkpoints`` folder
    counts as empty)."""
    out_dir = Path(out_dir)
    found = list_checkpoints(out_dir)
    if found:
        step, path = found[-1]
        saved = json.loads((path / STATE).read_text(encoding="utf-8")).get("identity", {})
        diffs = _differences(saved, identity)
        if diffs:
            raise LayerscopeError(
                f"{out_dir} holds checkpoints of a different fine-tuning run (latest at step {step}; "
                + "; ".join(diffs)
                + "): choose another --out or delete the folder"
            )
        return path
    if out_dir.exists():
        if not out_dir.is_dir():
            raise LayerscopeError(f"output folder {out_dir} is a file; choose another --out")
        others = sorted(p.name for p in out_dir.iterdir() if p.name != CHECKPOINTS)
        if others:
            what = "a finished fine-tune (finetune.json)" if "finetune.json" in others else f"files ({', '.join(others[:5])})"
            raise LayerscopeError(
                f"output folder {out_dir} already holds {what}; choose another --out or delete the folder"
            )
    return None


def load_checkpoint(
    path: Path,
    *,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> dict:
    """Load a checkpoint into the trainable parameters, optimizer, scheduler and RNG; return its state."""
    state = json.loads((Path(path) / STATE).read_text(encoding="utf-8"))
    if state["params"] != list(params):
        raise LayerscopeError(
            f"checkpoint {path} trains other parameters than this run ({len(state['params'])} there, "
            f"{len(params)} now); delete the folder and start again"
        )
    tensors = load_file(str(Path(path) / TENSORS))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    trainer = torch.load(Path(path) / TRAINER, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"], device)
    return state


def remove_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir(out_dir), ignore_errors=True)
