"""Pre-training a backbone on the embedded source task (`mkd_ray.data.scenes.source`), the
counterpart of ImageNet weights for the synthetic benchmarks: the paper's networks start from
a backbone trained on a large labeled classification set, and so can every row of a table here.

Pure PyTorch. The backbone is the one `model.*` builds (same layout, so `model.pretrained`
loads every tensor), with a global pool and a linear classifier on its last stage, trained with
random crops and flips. The result is cached under a name made from everything it depends on,
so a pipeline pre-trains once and every later run, branch and trial loads the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mkd_ray.config import ExperimentConfig, ModelConfig
from mkd_ray.data.scenes import source
from mkd_ray.evaluate import normalize
from mkd_ray.models.backbones import build_backbone


SOURCE = "source"  # model.pretrained's name for the source-task backbone of the model's layout
CACHE = Path("data/pretrained")
LAYOUT_KEYS = ("model.backbone", "model.width", "model.output_stride", "model.stem_pool")
MIN_ITERS = 20  # the one-cycle schedule warms up over a tenth of the run: at least two whole steps


@dataclass(frozen=True)
class SourceTask:
    per_category: int = 400  # training images per category (19 categories)
    heldout_per_category: int = 50
    image_size: int = 32
    iters: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # Torch threads while pre-training. A CPU's kernels sum in an order that depends on the
    # thread count, so one seed gives other weights on one thread than on two; fixed here (and
    # so in the cache's name), the backbone is the same on a laptop, a 2-core CI box and a node.
    threads: int = 2

    def __post_init__(self):
        if self.iters < MIN_ITERS:
            raise ValueError(f"SourceTask.iters: at least {MIN_ITERS} (a tenth of them warm the learning rate up), "
                             f"got {self.iters}")


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, high = self.backbone(x)
        return self.fc(high.mean(dim=(2, 3)))


def cache_path(folder: Path, model: ModelConfig, task: SourceTask) -> Path:
    """The file of this backbone pre-trained on this task: its name says what it is, its hash
    covers every setting it depends on."""
    layout = {k: getattr(model, k) for k in ("backbone", "width", "output_stride", "stem_pool")}
    identity = [layout, dataclasses.asdict(task), source.VERSION]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path(folder) / f"source-{model.backbone}-w{model.width:g}-{digest}.pt"


def pretrain(model: ModelConfig, task: SourceTask, mean, std, out: Path,
             log: Callable[[str], None] = print) -> dict:
    """Train the backbone on the source task, write its state dict (weights only) to `out` and
    a JSON report beside it; returns the report. Deterministic for a task on a given kind of CPU."""
    started = time.perf_counter()
    log(f"pre-training {model.backbone} (width {model.width:g}) on the source task: {len(source.CATEGORIES)} categories "
        f"x {task.per_category} images, {task.iters} iterations")
    images, labels = source.classification_set(task.per_category, task.image_size, task.seed)
    held_images, held_labels = source.classification_set(task.heldout_per_category, task.image_size, task.seed + 1)
    generated = time.perf_counter() - started

    with torch_threads(task.threads):
        torch.manual_seed(task.seed)
        backbone = build_backbone(model.backbone, model.output_stride, model.width, None, model.stem_pool)
        channels = backbone(torch.zeros(1, 3, task.image_size, task.image_size))[1].shape[1]
        net = _Classifier(backbone, channels, len(source.CATEGORIES))
        _fit(net, _as_input(images, mean, std), torch.from_numpy(labels), task, log)
        accuracy = _accuracy(net, _as_input(held_images, mean, std), torch.from_numpy(held_labels))
    report = {"categories": source.CATEGORIES, "task": dataclasses.asdict(task), "heldout_accuracy": accuracy,
              "generation_s": round(generated, 1), "seconds": round(time.perf_counter() - started, 1)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a name of its own, then renamed: a half-written file never looks like a
    # cached backbone, and two processes pre-training the same one do not write into each other.
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    torch.save(net.backbone.state_dict(), partial)
    partial.replace(out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


@contextmanager
def torch_threads(threads: int | None = None):
    """Inside the block (or decorated function), this process's torch threads are `threads`
    when given, or whatever the block sets; after it, the caller's again."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, task: SourceTask, log: Callable[[str], None]) -> None:
    """AdamW with a one-cycle schedule on random batches of (x, y), cropped and flipped."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, task.lr, total_steps=task.iters, pct_start=0.1)
    rng = np.random.default_rng(task.seed)
    net.train()
    for step in range(1, task.iters + 1):
        pick = torch.from_numpy(rng.integers(0, len(y), task.batch_size))
        loss = F.cross_entropy(net(_crop_and_flip(x[pick], rng)), y[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, task.iters // 10) == 0:
            log(f"pre-train step {step}/{task.iters}  loss={loss.item():.3f}")


def _as_input(images: np.ndarray, mean, std) -> torch.Tensor:
    return normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), mean, std)


def _crop_and_flip(x: torch.Tensor, rng: np.random.Generator, pad: int = 4) -> torch.Tensor:
    """A random crop of each image from its reflect-padded self, and a random horizontal flip."""
    size = x.shape[-1]
    padded = F.pad(x, [pad] * 4, mode="reflect")
    shifts = rng.integers(0, 2 * pad + 1, size=(len(x), 2))
    flips = rng.random(len(x)) < 0.5
    crops = [padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(shifts)]
    return torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips)])


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    predictions = torch.cat([net(chunk).argmax(1) for chunk in x.split(256)])
    net.train()
    return round((predictions == y).float().mean().item(), 4)


def with_source_backbone(cfg: ExperimentConfig, log: Callable[[str], None] = print,
                         task: SourceTask = SourceTask()) -> ExperimentConfig:
    """`model.pretrained: source` -> the absolute path of the source-task backbone of this
    layout, pre-trained here first when it is not cached yet (a few minutes on a CPU); any
    other value is returned unchanged. Drivers call it once, so workers and trials load a file."""
    if cfg.model.pretrained != SOURCE:
        return cfg
    path = cache_path(CACHE, cfg.model, task).resolve()
    if not path.is_file():
        pretrain(cfg.model, task, cfg.data.mean, cfg.data.std, path, log)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(path)))
