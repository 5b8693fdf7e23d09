"""Training checkpoints: one file, written atomically, read with weights-only unpickling.

A checkpoint holds everything a run needs to continue exactly where it stopped: the
students, teachers, ISDA statistics and threshold state (all in the method's state dict),
the optimizer and LR schedule, the step, torch's RNG state and the resolved config (data
augmentation draws its randomness from (seed, epoch, index), so it needs no state). The
config is stored as YAML text so `torch.load(weights_only=True)` can read the file. A
SHA-256 digest of the contents is stored with them: torch's zip container does not check
its data on load, so a changed byte would otherwise load silently as different weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import yaml

from mkd_ray.config import ExperimentConfig, config_from_dict
from mkd_ray.method.optim import apply_train_config

FORMAT_VERSION = 2  # 2: contents carry a SHA-256 digest
FILENAME = "state.pt"
_TEMP_PREFIX = ".state-"
# Keys whose change makes saved weights unusable.
ARCHITECTURE_KEYS = ("model.", "method.name", "method.feature_aug", "method.isda_teachers", "data.num_classes")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, tampered with or from an incompatible config."""


def save_checkpoint(path: Path, cfg: ExperimentConfig, method, optimizer=None, scheduler=None, extra: Optional[dict] = None) -> Path:
    """Write `path` (a directory) atomically: a temp file renamed into place, so a crash
    mid-save leaves the previous checkpoint, never a partial one."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "format_version": FORMAT_VERSION,
        "config_yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        "method": method.state_dict(),
        "step": int(method.iteration),
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["digest"] = _digest(state)
    for stale in path.glob(f"{_TEMP_PREFIX}*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=_TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path / FILENAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path / FILENAME


def load_state(path: Path, mmap: bool = False) -> dict:
    """Read a checkpoint file or directory with weights-only unpickling (`mmap`: tensors
    stay on disk until touched, for a cheap look at the config)."""
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated, tampered or not a torch file
        raise CheckpointError(f"checkpoint {file} cannot be read safely: {exc}") from None
    if not isinstance(state, dict) or "method" not in state:
        raise CheckpointError(f"checkpoint {file} is not an mkd_ray checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {file} has format {state.get('format_version')}; this version of "
                              f"mkd_ray reads format {FORMAT_VERSION} (written with an integrity digest)")
    if not mmap and state.get("digest") != _digest(state):  # a mmap look reads the config only
        raise CheckpointError(f"checkpoint {file} fails its integrity check: its contents changed after it was "
                              "written (tampered with or damaged); refusing to load it")
    return state


def _digest(state: dict) -> str:
    """SHA-256 over every value of the state but the digest itself, in a fixed order."""
    sha = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key != "digest" or value is not state:
                    sha.update(f"<{key!r}>".encode())
                    feed(value[key])
        elif isinstance(value, (list, tuple)):
            sha.update(f"[{len(value)}]".encode())
            for item in value:
                feed(item)
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            sha.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            sha.update(repr(value).encode())

    feed(state)
    return sha.hexdigest()


def checkpoint_config(state: dict) -> ExperimentConfig:
    return config_from_dict(yaml.safe_load(state["config_yaml"]))


def check_compatible(saved: ExperimentConfig, current: ExperimentConfig, source: str = "checkpoint") -> None:
    """Refuse weights whose architecture differs from the current config, naming the keys."""
    old, new = saved.flat(), current.flat()
    differing = [k for k in new if k.startswith(ARCHITECTURE_KEYS) and old.get(k) != new[k]]
    if differing:
        details = ", ".join(f"{k}: {old.get(k)!r} in the checkpoint vs {new[k]!r}" for k in differing)
        raise CheckpointError(f"{source} was trained with a different architecture ({details})")


def restore(state: dict, method, optimizer=None, scheduler=None, train_cfg=None) -> int:
    """Load a checkpoint into live objects; returns the step to continue from. With
    `train_cfg`, its learning rate, weight decay and momentum replace the saved ones."""
    try:
        method.load_state_dict(state["method"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if train_cfg is not None and optimizer is not None and scheduler is not None:
        apply_train_config(optimizer, scheduler, train_cfg)
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
