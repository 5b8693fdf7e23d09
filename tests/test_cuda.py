"""The GPU paths of the method core: CUDA training in each precision, agreement with the CPU,
and DistributedDataParallel over NCCL. Skipped where no CUDA device is visible (CI has none);
on a GPU machine: `python -m pytest tests/test_cuda.py` (needs only torch, torchvision, numpy,
Pillow and PyYAML, no Ray or MLflow)."""

import copy

import pytest
import torch
import torch.distributed as dist

from tests.conftest import REPO
from mkd_ray.config import load_config
from mkd_ray.engine import build_method, distributed_student, run_evaluation, to_batch, train_local
from mkd_ray.method import build_optimizer, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _config(overrides, *extra):
    return load_config(REPO / "pipelines" / "synthetic.yaml", [*overrides, "train.seed=0", *extra])


def _one_batch(cfg):
    """One labeled and one unlabeled batch, decoded and augmented on the CPU as training does."""
    from mkd_ray.data.sources import resolve_data
    from mkd_ray.data.torch_data import training_streams

    data = resolve_data(cfg)
    labeled, unlabeled = training_streams(data.labeled, data.unlabeled, cfg)
    return next(labeled), next(unlabeled)


@pytest.fixture
def exact_fp32():
    """TF32 off, so that CUDA convolutions and matmuls round like the CPU's fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_training_on_cuda_in_each_precision_learns(tiny_overrides, amp):
    cfg = _config(tiny_overrides, "scaling.use_gpu=true", f"train.amp={amp}", "train.iters=60",
                  "train.eval_interval=60", "train.log_interval=20")
    result = train_local(cfg, log=lambda *_: None)
    method = result["method"]
    assert all(p.device.type == CUDA.type for p in method.parameters())
    losses = [row["loss"] for row in result["history"]]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], f"{amp}: loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert 0.0 < result["val/miou"] <= 100.0


def test_a_cuda_step_computes_the_cpu_step_losses_and_gradients(tiny_overrides, exact_fp32):
    cfg = _config(tiny_overrides)
    labeled, unlabeled = _one_batch(cfg)
    on_cpu = build_method(cfg)
    on_cpu.train()
    on_cpu.iteration.fill_(cfg.train.iters // 2)  # ISDA and the unsupervised terms switched on
    on_gpu = copy.deepcopy(on_cpu).to(CUDA)
    outputs = []
    for method, device in ((on_cpu, torch.device("cpu")), (on_gpu, CUDA)):
        out = method.compute_losses(to_batch(labeled, unlabeled, cfg, device))
        out.loss.backward()
        outputs.append(out)
    for name in ("loss", "loss_sup", "loss_st", "loss_ss"):
        cpu_value, gpu_value = outputs[0].metrics[name], outputs[1].metrics[name].cpu()
        torch.testing.assert_close(gpu_value, cpu_value, rtol=2e-3, atol=1e-5, msg=name)
    for (name, p_cpu), p_gpu in zip(on_cpu.named_parameters(), on_gpu.parameters()):
        if p_cpu.grad is not None:
            scale = p_cpu.grad.abs().max().clamp(min=1e-6)
            assert (p_gpu.grad.cpu() - p_cpu.grad).abs().max() <= 5e-3 * scale, name


def test_nccl_ddp_training_with_fp16_and_a_gpu_reduction(tiny_overrides, tmp_path):
    """The distributed loop's GPU settings in one process: students under DDP with NCCL
    (wrapped as the Ray loop wraps them), fp16 autocast with a GradScaler, and an
    all-reduce of a CUDA tensor, which NCCL requires."""
    cfg = _config(tiny_overrides, "train.amp=fp16", "scaling.use_gpu=true")
    labeled, unlabeled = _one_batch(cfg)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        method = build_method(cfg).to(CUDA)
        method.wrap_students(lambda student: distributed_student(student, CUDA))
        method.train()
        optimizer, scheduler = build_optimizer(method, cfg.train)
        scaler = torch.amp.GradScaler()
        before = [p.detach().clone() for p in method.students.parameters()]
        for _ in range(3):
            out = train_step(method, optimizer, scheduler, to_batch(labeled, unlabeled, cfg, CUDA), cfg.train.amp, scaler)
            assert torch.isfinite(out.loss)
        moved = [not torch.equal(b, p) for b, p in zip(before, method.students.parameters())]
        assert sum(moved) > 0.9 * len(moved)
        total = torch.ones((), device=CUDA)
        dist.all_reduce(total)
        assert total.item() == 1.0
    finally:
        dist.destroy_process_group()


def test_cuda_evaluation_matches_the_cpu(tiny_overrides, exact_fp32):
    from mkd_ray.data.sources import resolve_data
    from mkd_ray.data.torch_data import eval_batches

    cfg = _config(tiny_overrides, "train.iters=40", "train.eval_interval=40")
    method = train_local(cfg, log=lambda *_: None)["method"].cpu()
    val = resolve_data(cfg).val
    meters = [run_evaluation(m, cfg, eval_batches(val, cfg, cfg.data.val_batch_size), device)
              for m, device in ((method, torch.device("cpu")), (copy.deepcopy(method).to(CUDA), CUDA))]
    assert abs(meters[0].miou() - meters[1].miou()) < 0.05
