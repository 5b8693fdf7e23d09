"""End-to-end CPU runs of the single-process loop on the synthetic data."""

import json
import subprocess
import sys

import pytest
import torch

from mkd_ray.config import load_config
from mkd_ray.data.io import load_mask
from mkd_ray.data.sources import resolve_data
from mkd_ray.metrics import MeanIoU
from mkd_ray.engine import train_local
from tests.conftest import REPO


def _run(overrides, method, iters):
    fixed = [f"method.name={method}", f"train.iters={iters}", f"train.eval_interval={iters}", "method.rampup_iters=0"]
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", fixed + overrides)
    return train_local(cfg, log=lambda *_: None)


def majority_class_miou(cfg) -> float:
    meter = MeanIoU(cfg.data.num_classes)
    for ref in resolve_data(cfg).val:
        mask = torch.from_numpy(load_mask(ref.mask))
        meter.update(torch.zeros_like(mask), mask)
    return meter.miou()


@pytest.mark.slow
def test_mkd_loss_decreases_and_miou_beats_chance(tiny_overrides):
    # The pipeline's own model (not the test-sized one), every image labeled, a short ramp.
    data_only = [o for o in tiny_overrides if not o.startswith("model.")]
    # 400 steps (measured 2026-12-07: supervised loss x0.68, 24.3 mIoU against chance 14.5,
    # best foreground class 24.6; 81 s where 800 steps took 153 s).
    result = _run(data_only + ["train.log_interval=50", "data.split=all", "method.rampup_iters=200"], "mkd", 400)
    sup = [h["loss_sup"] for h in result["history"]]
    assert sup[-1] < 0.8 * sup[0], sup  # ISDA widens the margins as training goes on
    # Chance is the majority-class predictor (all background, every foreground IoU 0):
    # the model must find foreground objects to beat it.
    chance = majority_class_miou(load_config(REPO / "pipelines" / "synthetic.yaml", tiny_overrides))
    assert result["val/miou"] > chance + 2.0, (chance, result["val/iou"])
    assert max(result["val/iou"][1:]) > 10.0, result["val/iou"]
    assert 0.0 <= result["history"][-1]["mask_ratio"] <= 1.0


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "cps"])
def test_baselines_run_through_the_same_loop(tiny_overrides, method):
    result = _run(tiny_overrides, method, 6)
    assert result["val/miou"] >= 0.0 and len(result["val/iou"]) == 5


@pytest.mark.parametrize("extra", [["method.feature_aug=dropout"], ["method.threshold_mode=class_adaptive"],
                                   ["method.distill_labeled=true", "method.bn_buffers=none"],
                                   ["eval.mode=sliding", "eval.model=ensemble"], ["eval.mode=center", "eval.model=teacher"],
                                   ["train.amp=bf16", "train.channels_last=true"]])
def test_method_options_run(tiny_overrides, extra):
    result = _run(tiny_overrides + extra, "mkd", 4)
    assert result["val/miou"] >= 0.0


def test_a_local_run_leaves_the_callers_torch_threads_as_they_were(tiny_overrides):
    # With 2 threads the run's branches go side by side at 1 torch thread each (process-wide).
    threads = torch.get_num_threads()
    assert threads >= 2  # conftest; below that the branches run in turn and nothing changes
    for extra in ([], ["train.threads=1"]):
        _run(tiny_overrides + extra, "mkd", 2)
        assert torch.get_num_threads() == threads


def test_diverging_run_stops_before_checkpointing_non_finite_weights(tiny_overrides, tmp_path):
    from mkd_ray.console import TrainingDiverged

    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", tiny_overrides + [
        "train.optimizer=sgd", "train.lr=1.0e+12", "train.iters=8", "train.log_interval=4", "train.checkpoint_interval=4"])
    with pytest.raises(TrainingDiverged, match=r"not finite by step 4 \(learning rate"):
        train_local(cfg, log=lambda *_: None, checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "state.pt").exists()


def test_cli_train_local_writes_summary(tiny_overrides, tmp_path):
    summary = tmp_path / "summary.json"
    sets = [a for o in tiny_overrides + ["train.iters=4", "train.eval_interval=4"] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "run.py", "train", "--local", "--summary", str(summary),
                           "--storage", str(tmp_path / "runs"), *sets],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "final val mIoU" in proc.stdout
    assert json.loads(summary.read_text())["step"] == 4


def test_cli_rejects_bad_config_before_work(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "train", "--local", "--set", "method.ema_decay=1.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "method.ema_decay" in proc.stderr and "[0, 1)" in proc.stderr


def test_cli_data_synth_and_splits(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.run([sys.executable, "run.py", "data", "synth", "--out", str(out), "--num-train", "32",
                           "--num-val", "8", "--seed", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "run.py", "data", "splits", "--dataset", "voc", "--root", str(out),
                           "--labeled", "1_4", "5", "--out", str(tmp_path / "splits")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "splits/1_4/labeled.txt").read_text().count("\n") == 8
    assert (tmp_path / "splits/5/unlabeled.txt").read_text().count("\n") == 27
    assert (tmp_path / "splits/val.txt").read_text().count("\n") == 8


def test_cli_eval_scores_a_checkpoint_and_writes_predictions(tiny_overrides, tmp_path):
    sets = [a for o in tiny_overrides + ["train.iters=4", "train.eval_interval=4"] for a in ("--set", o)]
    train = subprocess.run([sys.executable, "run.py", "train", "--local", "--name", "tiny", "--storage", str(tmp_path / "runs"),
                            "--summary", str(tmp_path / "train.json"), *sets], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, "run.py", "eval", "--local", "--checkpoint", str(tmp_path / "runs" / "tiny"),
                           "--save-predictions", str(out), "--summary", str(tmp_path / "eval.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    trained, scored = json.loads((tmp_path / "train.json").read_text()), json.loads((tmp_path / "eval.json").read_text())
    assert scored["val/miou"] == pytest.approx(trained["val/miou"])
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", tiny_overrides)
    val = resolve_data(cfg).val
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(r.name for r in val)
    first = load_mask(out / f"{val[0].name}.png")
    assert first.shape == load_mask(val[0].mask).shape and first.max() < 5


def test_cli_eval_refuses_missing_and_foreign_checkpoints(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "eval", "--checkpoint", str(tmp_path / "nope")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "junk.pt").write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "run.py", "eval", "--checkpoint", str(tmp_path / "junk.pt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot be read safely" in proc.stderr


def test_bad_mask_stops_the_run_before_training_and_writes_nothing(tiny_overrides, tmp_path):
    import shutil

    from mkd_ray.data.io import DatasetError, save_mask

    root = tmp_path / "data"
    shutil.copytree(next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("data.root=")), root)
    first = (root / "splits/1_8/labeled.txt").read_text().split()[1]
    mask = load_mask(root / first)
    mask[0, 0] = 9
    save_mask(mask, root / first)
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", tiny_overrides + [f"data.root={root}"])
    with pytest.raises(DatasetError, match=rf"{first.split('/')[-1]}.*\[9\]"):
        train_local(cfg, log=lambda *_: None, checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_local_training_goes_on_past_unreadable_unlabeled_images(synthetic_root, tiny_overrides, tmp_path):
    from tests.test_data import corrupt_copy

    root, _ = corrupt_copy(synthetic_root, tmp_path, "splits/1_8/unlabeled.txt", 20)
    result = _run(tiny_overrides + [f"data.root={root}", "train.log_interval=4"], "mkd", 4)
    assert result["step"] == 4 and result["history"][-1]["data/skipped"] > 0


def test_progress_lines_average_kept_pseudo_label_accuracy_over_the_steps_that_kept_pixels():
    import math

    import torch

    from mkd_ray.engine import ProgressMeter

    meter = ProgressMeter(total_iters=10)
    for kept in (float("nan"), 0.8, 0.6):  # the first step kept no pixel
        meter.add({"loss": torch.tensor(1.0), "pseudo_acc_kept": torch.tensor(kept)})
    values = meter.summary(3)
    assert values["pseudo_acc_kept"] == pytest.approx(0.7) and values["loss"] == pytest.approx(1.0)
    meter.add({"loss": torch.tensor(1.0), "pseudo_acc_kept": torch.tensor(float("nan"))})
    values = meter.summary(4)
    assert math.isnan(values["pseudo_acc_kept"])
    assert "pseudo_acc_kept=-" in ProgressMeter.line(4, 10, values) and "nan" not in ProgressMeter.line(4, 10, values)
