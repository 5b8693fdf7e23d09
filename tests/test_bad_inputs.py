"""The bad-input catalogue: every entry is a `run.py` command line that must fail with a clear
error naming the problem, exit non-zero, start no Ray work, and change no file already there.

Commands run in-process through `mkd_ray.cli.main` (what run.py calls), in a workspace that
holds what a user has to lose: a dataset, a local checkpoint, a Ray Train run, a sweep, a
Parquet pack target and an MLflow store."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from mkd_ray import checkpoint as ckpt
from mkd_ray.cli import main
from mkd_ray.config import load_config
from mkd_ray.data.io import load_mask, save_mask
from mkd_ray.engine import build_method
from tests.conftest import REPO, TINY


def _edit_split(root: Path, split_file: str, edit) -> None:
    path = root / split_file
    path.write_text(edit(path.read_text()))


def _bad_class_id(root: Path) -> None:
    mask_file = root / (root / "splits/1_8/labeled.txt").read_text().split()[1]
    mask = load_mask(mask_file)
    mask[0, 0] = 9
    save_mask(mask, mask_file)


def _truncated_labeled_image(root: Path) -> None:
    image = root / (root / "splits/1_8/labeled.txt").read_text().split()[0]
    image.write_bytes(image.read_bytes()[:40])


# Dataset damage, applied to a fresh copy of the dataset at data/broken.
DAMAGE = {
    "missing image": lambda root: _edit_split(root, "splits/1_8/labeled.txt", lambda t: "JPEGImages/nope.jpg " + t.split(" ", 1)[1]),
    "three fields": lambda root: _edit_split(root, "splits/1_8/labeled.txt", lambda t: "a b c\n" + t),
    "empty unlabeled": lambda root: _edit_split(root, "splits/1_8/unlabeled.txt", lambda t: ""),
    "bad class id": _bad_class_id,
    "truncated image": _truncated_labeled_image,
    "no val list": lambda root: (root / "splits/val.txt").unlink(),
}

T = ["--set", "data.root=data/broken"]  # a damaged copy of the dataset
SPACE = "spaces/space.yaml"

# (id, argv, words the error must contain, damage to the dataset copy or None)
CASES = [
    # pipeline YAML and --set
    ("typo in a key", ["train", "--set", "method.ema_decy=0.9"], ["method.ema_decy", "did you mean 'ema_decay'"], None),
    ("value out of range", ["train", "--set", "method.ema_decay=1.0"], ["method.ema_decay", "[0, 1)"], None),
    ("not a number", ["train", "--set", "train.iters=many"], ["train.iters", "many"], None),
    ("override without =", ["train", "--set", "data.split"], ["key.path=value"], None),
    ("unknown choice", ["train", "--set", "model.backbone=vgg16"], ["model.backbone", "'resnet50'"], None),
    ("bad placement", ["train", "--set", "scaling.placement_strategy=RANDOM"], ["scaling.placement_strategy", "'SPREAD'"], None),
    ("bad bad_samples", ["train", "--set", "data.bad_samples=ignore"], ["data.bad_samples", "'skip'"], None),
    ("missing pipeline", ["train", "--pipeline", "nowhere.yaml"], ["nowhere.yaml", "does not exist"], None),
    ("pipeline not YAML", ["train", "--pipeline", "pipelines/broken.yaml"], ["broken.yaml", "not valid YAML"], None),
    ("pipeline not a mapping", ["train", "--pipeline", "pipelines/list.yaml"], ["list.yaml"], None),
    ("local run, bad key", ["train", "--local", "--set", "train.lr=0"], ["train.lr", "(0, inf]"], None),
    ("pretrained weights 'none'", ["train", "--local", "--set", "model.pretrained=none"],
     ["model.pretrained", "'none' does not exist", "'imagenet'", "--set model.pretrained=null"], None),
    # search-space YAML
    ("space key typo", ["tune", "--space", SPACE, "--set", "tune.schedular=asha"], ["tune.schedular", "'scheduler'"], None),
    ("space unknown scheduler", ["tune", "--space", SPACE, "--set", "tune.scheduler=hyperband"], ["tune.scheduler", "'asha'"], None),
    ("space range reaches 1", ["tune", "--space", "spaces/ema.yaml"], ["space.method.ema_decay", "1.0"], None),
    ("missing space", ["tune", "--space", "spaces/nowhere.yaml"], ["nowhere.yaml", "does not exist"], None),
    ("resume with no sweep", ["tune", "--space", SPACE, "--resume", "--storage", "runs"], ["--resume", "no sweep"], None),
    ("sweep name taken", ["tune", "--space", SPACE, "--storage", "runs", "--name", "sweep-taken"], ["sweep-taken", "already exists"], None),
    # CLI arguments
    ("unknown command", ["fly"], ["invalid choice"], None),
    ("eval without checkpoint", ["eval"], ["--checkpoint"], None),
    ("eval bad mode", ["eval", "--checkpoint", "ckpt", "--mode", "tiled"], ["--mode", "tiled"], None),
    ("submit without command", ["submit", "--address", "http://127.0.0.1:9"], ["give the run.py command"], None),
    ("submit bad inner config", ["submit", "--address", "http://127.0.0.1:9", "--", "train", "--set", "method.lambda_ss=-1"],
     ["method.lambda_ss"], None),
    ("jobs without address", ["jobs", "list"], ["--address"], None),
    ("pretrain too short to schedule", ["pretrain", "--iters", "10"], ["--iters", "at least 20"], None),
    ("pack into a non-empty folder", ["data", "pack", "--out", "pack"], ["pack", "not empty"], None),
    ("pack rows-per-file 0", ["data", "pack", "--out", "newpack", "--rows-per-file", "0"], ["--rows-per-file"], None),
    ("folder splits without lists", ["data", "splits", "--dataset", "folder", "--root", "data/ok", "--labeled", "1_8"],
     ["--list"], None),
    # dataset layout
    ("missing data root", ["train", "--set", "data.root=data/nowhere", "--set", "data.dataset=folder"], ["data/nowhere", "does not exist"], None),
    ("missing split", ["train", "--set", "data.root=data/ok", "--set", "data.split=1_3"], ["data.split '1_3'"], None),
    ("missing split, source backbone", ["train", "--local", "--set", "data.root=data/ok", "--set", "data.split=1_3",
                                        "--set", "model.pretrained=source"], ["data.split '1_3'"], None),
    ("split names a missing image", ["train", *T], ["labeled.txt:1", "nope.jpg", "does not exist"], "missing image"),
    ("malformed split line", ["train", *T], ["labeled.txt:1", "expected '<image> <mask>'"], "three fields"),
    ("empty unlabeled list", ["train", *T], ["unlabeled.txt", "no samples"], "empty unlabeled"),
    ("mask with class 9", ["train", *T], ["[9]", "valid ids are 0..4"], "bad class id"),
    ("truncated labeled image", ["train", "--local", *T], ["cannot read image", "data.bad_samples=skip"], "truncated image"),
    ("no validation list", ["train", *T], ["val.txt", "does not exist"], "no val list"),
    ("synthetic root is not synthetic", ["train", "--set", "data.root=pack"], ["pack", "not a synthetic dataset"], None),
    # checkpoints
    ("missing checkpoint", ["eval", "--checkpoint", "runs/none"], ["runs/none", "does not exist"], None),
    ("junk checkpoint", ["eval", "--checkpoint", "junk.pt"], ["junk.pt", "cannot be read safely"], None),
    ("pickle that runs code", ["eval", "--checkpoint", "evil.pt"], ["evil.pt", "cannot be read safely"], None),
    ("tampered checkpoint", ["eval", "--checkpoint", "tampered"], ["tampered", "integrity check"], None),
    ("eval another architecture", ["eval", "--checkpoint", "ckpt", "--pipeline", "pipelines/synthetic.yaml",
                                   "--set", "data.root=data/ok", "--set", "model.width=0.5"], ["model.width", "different architecture"], None),
    ("local resume, another architecture", ["train", "--local", "--storage", ".", "--name", "ckpt", "--set", "model.width=0.5"],
     ["model.width: 0.25 in the checkpoint vs 0.5"], None),
    ("Ray resume, another architecture", ["train", "--storage", "runs", "--name", "rayrun", "--set", "model.width=0.5"],
     ["rayrun", "model.width: 0.25 in the checkpoint vs 0.5"], None),
]


@pytest.fixture(scope="module")
def workspace(synthetic_root, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("workspace")
    shutil.copytree(synthetic_root, home / "data" / "ok")
    (home / "pipelines").mkdir()
    shutil.copy(REPO / "pipelines" / "synthetic.yaml", home / "pipelines" / "synthetic.yaml")
    (home / "pipelines" / "broken.yaml").write_text("method: [1, 2\n")
    (home / "pipelines" / "list.yaml").write_text("- 1\n- 2\n")
    (home / "spaces").mkdir()
    base = home / "pipelines" / "synthetic.yaml"
    (home / SPACE).write_text(f"base: {base}\nspace:\n  method.tau_t: {{uniform: [0.8, 0.95]}}\n")
    (home / "spaces" / "ema.yaml").write_text(f"base: {base}\nspace:\n  method.ema_decay: {{uniform: [0.9, 1.0]}}\n")
    cfg = load_config(base, TINY + [f"data.root={home / 'data' / 'ok'}"])
    ckpt.save_checkpoint(home / "ckpt", cfg, build_method(cfg))
    ckpt.save_checkpoint(home / "runs" / "rayrun" / "step_00000006", cfg, build_method(cfg))
    (home / "runs" / "rayrun" / "checkpoint_manager_snapshot.json").write_text(
        '{"latest_checkpoint_result": {"checkpoint_dir_name": "step_00000006"}}')
    shutil.copytree(home / "ckpt", home / "tampered")
    data = bytearray((home / "tampered" / ckpt.FILENAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (home / "tampered" / ckpt.FILENAME).write_bytes(bytes(data))
    (home / "junk.pt").write_bytes(b"not a checkpoint")
    with open(home / "evil.pt", "wb") as handle:
        pickle.dump(os.system, handle)
    (home / "runs" / "sweep-taken").mkdir()
    (home / "runs" / "sweep-taken" / "tuner.pkl").write_bytes(b"a sweep's state")
    (home / "pack").mkdir()
    (home / "pack" / "keep.txt").write_text("someone's files")
    (home / "mlflow.db").write_bytes(b"an MLflow store")
    return home


def _snapshot(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(home.rglob("*")) if p.is_file()}


def test_the_catalogue_has_at_least_thirty_entries_in_every_category():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_before_any_work(case, workspace, monkeypatch, capsys):
    name, argv, words, damage = case
    monkeypatch.chdir(workspace)
    store = workspace / "mlflow.db"  # the workspace's own tracking store, which must stay untouched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    broken = workspace / "data" / "broken"
    shutil.rmtree(broken, ignore_errors=True)
    if damage:
        shutil.copytree(workspace / "data" / "ok", broken)
        DAMAGE[damage](broken)
    extra = []
    if argv[0] in ("train", "tune") or argv[:2] == ["data", "pack"]:  # the small dataset's settings
        extra = [a for o in TINY for a in ("--set", o)]
        if not any(a.startswith("data.root=") for a in argv):
            extra += ["--set", "data.root=data/ok"]
    before = _snapshot(workspace)
    try:
        command = 2 if argv[0] == "data" else 1  # the case's own --set values come last, and win
        code = main([*argv[:command], *extra, *argv[command:]])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{name}: accepted"
    for word in words:
        assert word in err, f"{name}: {word!r} not in {err!r}"
    assert "Traceback" not in err
    assert not ray.is_initialized(), f"{name}: Ray was started"
    after = _snapshot(workspace)
    assert {k: v for k, v in before.items() if after.get(k) != v} == {}, f"{name}: changed or removed files"


@pytest.mark.parametrize("command", [["train"], ["tune", "--space", SPACE]], ids=["train", "tune"])
def test_an_mlflow_store_of_another_schema_is_refused_naming_it_before_any_work(command, workspace, monkeypatch, capsys):
    """A store that this MLflow cannot use (here: an SQLite store whose schema version no
    MLflow release has) is named with the way out, before Ray starts, and left as it was."""
    store = workspace / "other-schema.db"
    if not store.exists():  # a real store, made in another process (MLflow caches the stores it opened)
        make = ("import sqlite3, sys; from mlflow.tracking import MlflowClient; "
                "MlflowClient(tracking_uri='sqlite:///' + sys.argv[1]).search_experiments(); "
                "db = sqlite3.connect(sys.argv[1]); db.execute(\"UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'\"); "
                "db.commit()")
        subprocess.run([sys.executable, "-c", make, str(store)], check=True, timeout=120)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    before = _snapshot(workspace)
    code = main([*command, *[a for o in TINY for a in ("--set", o)], "--set", "data.root=data/ok"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: MLflow store sqlite:///{store} cannot be opened") and "f0f0f0f0f0f0" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized()
    assert _snapshot(workspace) == before
