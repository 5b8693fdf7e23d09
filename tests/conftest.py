import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings over the synthetic pipeline for end-to-end tests.
TINY = [
    "model.width=0.25",
    "model.output_stride=8",
    "model.aspp_rates=[1,2,3]",
    "model.aspp_channels=32",
    "model.decoder_channels=32",
    "model.low_level_channels=16",
    "data.synth.num_train=128",
    "data.synth.num_val=32",
    "data.synth.splits=['1_8']",
    "train.lr=0.005",
    "data.split=1_8",
    "train.log_interval=10",
    "method.warmup_iters=0",  # the pipeline's supervised-only warm-up would cover every step of a short run
]


class TinySeg(nn.Module):
    """A 1x1-conv 'segmentation network' whose features are its input: logits are hand-computable."""

    def __init__(self, num_classes: int = 3, dim: int = 3):
        super().__init__()
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x, fp_dropout: float = 0.0):
        out = {"features": x, "logits": self.classifier(x)}
        if fp_dropout:
            out["logits_fp"] = self.classifier(nn.functional.dropout2d(x, fp_dropout, True))
        return out

    def backbone_parameters(self):
        return []

    def head_parameters(self):
        return list(self.parameters())


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from mkd_ray.config import load_config
    from mkd_ray.data.sources import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", TINY + [f"data.root={root}"])
    ensure_synthetic(cfg, log=lambda *_: None)
    return root


@pytest.fixture
def tiny_overrides(synthetic_root) -> list[str]:
    return TINY + [f"data.root={synthetic_root}"]


@pytest.fixture(scope="session")
def packed_uri(synthetic_root, tmp_path_factory) -> str:
    """The synthetic dataset as a Parquet pack, addressed by a file:// URI as a cluster would."""
    from mkd_ray.data.packed import write_pack

    out = tmp_path_factory.mktemp("pack") / "synthetic"
    write_pack(synthetic_root, synthetic_root / "splits", f"file://{out}", rows_per_file=40)
    return f"file://{out}"
