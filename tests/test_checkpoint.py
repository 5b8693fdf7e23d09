import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from mkd_ray import checkpoint as ckpt
from mkd_ray.config import load_config
from mkd_ray.engine import build_method, train_local
from tests.conftest import REPO


def _cfg(overrides, *extra):
    return load_config(REPO / "pipelines" / "synthetic.yaml", overrides + ["train.iters=6", "train.eval_interval=6",
                                                                           "train.checkpoint_interval=3", *extra])


# Warm-up 4: stopped inside the supervised-only steps, where no unlabeled batch is read.
@pytest.mark.parametrize("warmup", [0, 4])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tiny_overrides, tmp_path, warmup):
    quiet = dict(log=lambda *_: None)
    overrides = tiny_overrides + [f"method.warmup_iters={warmup}"]
    straight = train_local(_cfg(overrides), checkpoint_dir=tmp_path / "a", **quiet)["method"]
    train_local(_cfg(overrides, "train.stop_at=3"), checkpoint_dir=tmp_path / "b", **quiet)
    assert ckpt.load_state(tmp_path / "b")["step"] == 3
    resumed = train_local(_cfg(overrides), checkpoint_dir=tmp_path / "b", **quiet)["method"]
    assert int(resumed.iteration) == 6
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_from_another_architecture_is_refused(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides)
    method = build_method(cfg)
    ckpt.save_checkpoint(tmp_path, cfg, method)
    other = _cfg(tiny_overrides, "model.width=0.5")
    with pytest.raises(ckpt.CheckpointError, match=r"model.width: 0.25 in the checkpoint vs 0.5"):
        ckpt.check_compatible(ckpt.checkpoint_config(ckpt.load_state(tmp_path)), other)
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        ckpt.restore(ckpt.load_state(tmp_path), build_method(other))


def test_a_changed_byte_in_a_checkpoint_is_refused(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides)
    file = ckpt.save_checkpoint(tmp_path, cfg, build_method(cfg))
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data, which torch's zip reader does not check
    file.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="fails its integrity check"):
        ckpt.load_state(tmp_path)


def test_tampered_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read safely"):
        ckpt.load_state(tmp_path / "junk.pt")
    # A pickle that would run code on load: weights-only unpickling refuses it.
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump(os.system, handle)
    with pytest.raises(ckpt.CheckpointError, match="cannot be read safely"):
        ckpt.load_state(tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match="not an mkd_ray checkpoint"):
        ckpt.load_state(tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_state(tmp_path / "missing")


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    cfg = _cfg(tiny_overrides)
    method = build_method(cfg)
    ckpt.save_checkpoint(tmp_path, cfg, method)
    before = (tmp_path / ckpt.FILENAME).read_bytes()
    method.iteration.fill_(99)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, cfg, method)
    assert (tmp_path / ckpt.FILENAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.FILENAME]


SAVER = """
import sys, torch
from mkd_ray import checkpoint as ckpt
from mkd_ray.config import load_config
from mkd_ray.engine import build_method
cfg = load_config(sys.argv[1], sys.argv[3:])
method = build_method(cfg)
start = int(ckpt.load_state(sys.argv[2])["step"]) if (ckpt.os.path.exists(sys.argv[2] + "/state.pt")) else 0
for step in range(start + 1, 10**6):
    with torch.no_grad():  # every float of checkpoint k holds the value k
        for tensor in method.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(step)
    method.iteration.fill_(step)
    ckpt.save_checkpoint(sys.argv[2], cfg, method)
"""


def test_saves_killed_midway_leave_the_previous_whole_checkpoint(tmp_path):
    """SIGKILL a process that saves checkpoints back to back, each time while a save is
    writing its temp file: what is left always loads and is one whole checkpoint."""
    target = tmp_path / "run"
    target.mkdir()
    last = 0
    for kill in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(REPO / "pipelines" / "synthetic.yaml"), str(target)],
                                cwd=REPO)
        deadline = time.monotonic() + 120
        # Wait for at least one save of this process, then for the next save to be mid-write.
        while not (target / ckpt.FILENAME).is_file() or ckpt.load_state(target, mmap=True)["step"] <= last:
            assert proc.poll() is None and time.monotonic() < deadline, "the saver stopped saving"
            time.sleep(0.01)
        while not list(target.glob(".state-*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, "no save was caught mid-write"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = ckpt.load_state(target)  # whole, or refused by the digest: never a partial load
        step = state["step"]
        assert step > last
        floats = [t for t in state["method"].values() if t.is_floating_point()]
        assert all(bool((t == step).all()) for t in floats), "a checkpoint mixes two saves"
        last = step
    assert len(list(target.glob(".state-*.tmp"))) <= 1  # a new save clears what a killed one left
