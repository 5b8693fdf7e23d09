"""Ray Train engine against a real local Ray cluster (no mocks)."""

import tempfile

import pytest
import ray
import torch

from mkd_ray import checkpoint as ckpt
from mkd_ray.config import load_config
from mkd_ray.data.io import DatasetError
from mkd_ray.data.sources import resolve_data
from mkd_ray.data.torch_data import eval_batches
from mkd_ray.engine import build_method, run_evaluation
from mkd_ray.train.trainer import fit
from tests.conftest import REPO

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    # A short temp path: Ray's socket paths must stay under the OS limit.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    yield
    ray.shutdown()


def _cfg(tiny_overrides, *extra):
    return load_config(REPO / "pipelines" / "synthetic.yaml", tiny_overrides + [
        "train.iters=6", "train.eval_interval=6", "train.checkpoint_interval=3", "train.log_interval=3",
        "scaling.cpus_per_worker=0.5", *extra])


def test_bad_dataset_fails_before_ray_work(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, f"data.root={tmp_path / 'nowhere'}", "data.dataset=folder")
    with pytest.raises(DatasetError, match="nowhere"):
        fit(cfg, name="bad", storage_path=tmp_path)


def test_two_worker_ddp_keeps_students_identical_and_reduces_validation(ray_cluster, tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, "scaling.num_workers=2")
    result = fit(cfg, name="ddp", storage_path=tmp_path)
    metrics = result.metrics
    assert metrics["step"] == 6
    assert metrics["ddp/max_param_diff"] == 0.0  # DDP averaged the gradients on both ranks
    assert metrics["data/shared_draws"] == 0.0  # each rank read its own unlabeled shard
    # The all-reduced mIoU equals one process scoring the same checkpoint: exactly when it
    # batches the two halves as the ranks did (one thread each, like the workers), and up to
    # float noise in a handful of pixels when it batches the whole set its own way.
    state = ckpt.load_state(result.checkpoint.path)
    method = build_method(cfg)
    ckpt.restore(state, method)
    val = resolve_data(cfg).val
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        halves = [run_evaluation(method, cfg, eval_batches(val[r::2], cfg, cfg.data.val_batch_size), "cpu") for r in (0, 1)]
        whole = run_evaluation(method, cfg, eval_batches(val, cfg, cfg.data.val_batch_size), "cpu")
    finally:
        torch.set_num_threads(threads)
    assert metrics["val/miou"] == pytest.approx(halves[0].merge(halves[1]).miou(), abs=1e-9)
    assert metrics["val/miou"] == pytest.approx(whole.miou(), abs=0.1)


def test_run_started_again_resumes_bitwise(ray_cluster, tiny_overrides, tmp_path):
    straight = fit(_cfg(tiny_overrides), name="straight", storage_path=tmp_path)
    stopped = fit(_cfg(tiny_overrides, "train.stop_at=3"), name="resumed", storage_path=tmp_path)
    assert stopped.metrics["step"] == 3
    resumed = fit(_cfg(tiny_overrides), name="resumed", storage_path=tmp_path)
    assert resumed.metrics["step"] == 6
    a = ckpt.load_state(straight.checkpoint.path)["method"]
    b = ckpt.load_state(resumed.checkpoint.path)["method"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
