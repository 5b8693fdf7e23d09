"""What a user of their own dataset meets (issue 22, item 8): what the console says was read,
unlabeled masks that are not there, and a synthetic dataset generated with other settings.
Single-process paths only: nothing here starts Ray."""

from __future__ import annotations

import hashlib
import shlex
import shutil
from pathlib import Path

import pytest
import ray

from mkd_ray.cli import main
from mkd_ray.config import load_config
from mkd_ray.data import synthetic
from mkd_ray.data.io import DatasetError
from mkd_ray.data.packed import write_pack
from mkd_ray.data.sources import checked_data
from mkd_ray.data.torch_data import TrainSet
from tests.conftest import REPO, TINY


def _set(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_command_prints_one_line_saying_what_data_it_read(tiny_overrides, synthetic_root, tmp_path, capsys):
    code = main(["train", "--local", "--storage", str(tmp_path), *_set(tiny_overrides + ["train.iters=1"])])
    assert code == 0
    summaries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data:")]
    # TINY: 128 training images, 1/8 of them labeled, 32 validation images, 5 classes.
    assert summaries == [f"data: synthetic split 1_8: 16 labeled, 112 unlabeled, 32 val images, 5 classes "
                         f"(root {synthetic_root})"]


def _without_unlabeled_masks(source: Path, out: Path, count: int) -> tuple[Path, list[str]]:
    """A copy of the dataset whose first `count` unlabeled masks of split 1_8 are gone."""
    shutil.copytree(source, out)
    lines = (out / "splits/1_8/unlabeled.txt").read_text().splitlines()
    masks = [line.split()[1] for line in lines[:count]]
    for mask in masks:
        (out / mask).unlink()
    return out, masks


@pytest.mark.parametrize("data_format", ["folder", "parquet"])
def test_missing_unlabeled_masks_switch_the_diagnostic_off_with_one_warning(data_format, synthetic_root, tmp_path):
    root, masks = _without_unlabeled_masks(synthetic_root, tmp_path / "data", 3)
    overrides = TINY + [f"data.root={root}"]
    if data_format == "parquet":  # a pack of split 1_8 and val.txt, as `run.py data pack` writes one
        splits = tmp_path / "splits"
        shutil.copytree(root / "splits/1_8", splits / "1_8")
        shutil.copy(root / "splits/val.txt", splits / "val.txt")
        write_pack(root, splits, str(tmp_path / "pack"))
        overrides += ["data.format=parquet", f"data.root={tmp_path / 'pack'}"]
    cfg = load_config(None, overrides)
    lines: list[str] = []
    data = checked_data(cfg, lines.append)
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and "3 of the 112" in warnings[0] and masks[0] in warnings[0], warnings
    assert [ref.mask for ref in data.unlabeled[:3]] == [None] * 3 and data.unlabeled[3].mask is not None
    unlabeled = TrainSet(data.unlabeled, cfg, labeled=False)
    assert (unlabeled._views(0, 0)["mask"] == 255).all()  # unknown: the diagnostic leaves it out
    assert (unlabeled._views(0, 3)["mask"] != 255).any()

    # Labeled masks are still required, in a folder and when packing one.
    labeled_mask = (root / "splits/1_8/labeled.txt").read_text().split()[1]
    (root / labeled_mask).unlink()
    with pytest.raises(DatasetError, match=f"labeled.txt:1: .*{labeled_mask} does not exist"):
        if data_format == "folder":
            checked_data(cfg, lines.append)
        else:
            write_pack(root, tmp_path / "splits", str(tmp_path / "pack2"))


def test_train_never_overwrites_a_synthetic_dataset_generated_with_other_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "mine"
    assert main(["data", "synth", "--out", str(data), "--seed", "14", "--num-train", "32", "--num-val", "4"]) == 0
    before = _snapshot(data)
    # The pipeline's data.synth (seed 0, 1024 + 256 images, ...) differs from the dataset's.
    argv = ["train", "--local", "--pipeline", str(REPO / "pipelines/synthetic.yaml"), "--storage", str(tmp_path),
            "--set", f"data.root={data}", "--set", "train.iters=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for words in ("seed: dataset 14, config 0", "num_train: dataset 32, config 1024", "--set data.synth.seed=14",
                  "nothing was changed"):
        assert words in err, err
    assert "Traceback" not in err and not ray.is_initialized()
    assert _snapshot(data) == before
    # The overrides the error suggests make the config match the dataset.
    suggested = shlex.split(err[err.index("--set"):err.index(", or set data.root")])
    cfg = load_config(REPO / "pipelines/synthetic.yaml", suggested[1::2] + [f"data.root={data}"])
    assert synthetic.is_generated(data, cfg.data.synth)
