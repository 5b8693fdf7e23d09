"""`train_loop_per_worker`: the method's step under DDP, fed by Ray Data, reporting to Ray Train.

Runs on every training worker. Students are wrapped in DistributedDataParallel (gloo on
CPU, NCCL on GPU, chosen by Ray from `use_gpu`); teachers are not, they follow their own
students by EMA on every rank identically. Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import json
import queue
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mkd_ray import checkpoint as ckpt
from mkd_ray.config import ExperimentConfig, config_from_dict
from mkd_ray.console import Heartbeat, TrainingDiverged
from mkd_ray.data.io import voc_palette
from mkd_ray.data.ray_data import draws_per_step
from mkd_ray.data.torch_data import endless_loader, eval_batches
from mkd_ray.engine import (ProgressMeter, build_method, configure_threads, distribute_students,
                            is_report_step, run_evaluation, to_batch)
from mkd_ray.method import build_optimizer, train_step
from mkd_ray.metrics import MeanIoU
from mkd_ray.tracking import RunLogger, iou_table, overlay_grid
from mkd_ray.train.callbacks import DIVERGED


def _unlabeled_batches(cfg: ExperimentConfig, seen_draws: set, first_draw: int):
    """This rank's unlabeled batches from draw `first_draw` on. The trainer starts the stream
    at the draw of the checkpoint Ray restores (both read Ray's checkpoint record); draws
    before `first_draw`, should the stream start earlier, are skipped."""
    shard = ray.train.get_dataset_shard("unlabeled")
    for batch in shard.iter_torch_batches(batch_size=cfg.data.unlabeled_batch_size, drop_last=True, device="cpu"):
        if int(batch["draw"].min()) < first_draw:
            continue
        batch["ignore"] = batch["ignore"].bool()
        batch["cutmix"] = batch["cutmix"].bool()
        draws = batch.pop("draw")
        if len(seen_draws) < _MAX_TRACKED_DRAWS:
            seen_draws.update(draws.tolist())
        yield batch


_MAX_TRACKED_DRAWS = 100_000


def _started(batches):
    """`batches`, its first item already being fetched in a thread: the stream's start (Ray
    Data's coordinator and actors, seconds of process start-up) overlaps the caller's own."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="unlabeled-start")
    first = pool.submit(next, batches, None)
    pool.shutdown(wait=False)

    def resumed():
        head = first.result()
        if head is not None:
            yield head
            yield from batches

    return resumed()


def load_checkpoint(checkpoint: ray.train.Checkpoint, mmap: bool = False) -> dict:
    """A Ray Train checkpoint's state (local or in storage); `mmap`: for a cheap look."""
    with checkpoint.as_directory() as directory:
        return ckpt.load_state(directory, mmap=mmap)


def _consistency_metrics(method, seen_draws: set, world: int) -> dict[str, float]:
    """DDP health: how far student weights drift apart across ranks (0 when DDP works), and
    how many unlabeled draws more than one rank consumed (0 when shards are disjoint)."""
    if world == 1:
        return {"ddp/max_param_diff": 0.0, "data/shared_draws": 0.0}
    flat = torch.cat([p.detach().flatten().float() for s in method.students for p in s.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    drift = max((g - gathered[0]).abs().max().item() for g in gathered)
    draws: list = [None] * world
    dist.all_gather_object(draws, seen_draws)
    shared = sum(len(a & b) for i, a in enumerate(draws) for b in draws[i + 1 :])
    return {"ddp/max_param_diff": drift, "data/shared_draws": float(shared)}


def _topology(context, world: int, method) -> list[dict]:
    """Every rank's place in the cluster (gathered on all ranks): which node, which local rank,
    and how it runs a step (torch threads; the branches side by side or in turn)."""
    me = {"world_rank": context.get_world_rank(), "local_rank": context.get_local_rank(),
          "node_rank": context.get_node_rank(), "node_id": ray.get_runtime_context().get_node_id(),
          "torch_threads": torch.get_num_threads(), "branches_side_by_side": method.branches.is_parallel}
    if world == 1:
        return [me]
    ranks: list = [None] * world
    dist.all_gather_object(ranks, me)
    return ranks


def _broadcast_buffers(method, world: int) -> None:
    """Give every rank rank 0's BatchNorm statistics (students and teachers).

    Each rank's forward updates the running statistics with its own batch (DDP does not
    broadcast them before each forward: see engine.distributed_student), so ranks drift
    apart slightly between reports, and so do the teachers that average them. Evaluation
    and checkpoints use rank 0's, on every rank.
    """
    if world == 1:
        return
    for net in [*method.students, *method.teachers]:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def _evaluate_sharded(method, cfg: ExperimentConfig, data, device, rank: int, world: int) -> MeanIoU:
    """Each rank scores its slice of the validation set; confusion matrices are summed."""
    meter = run_evaluation(method, cfg, eval_batches(data.val[rank::world], cfg, cfg.data.val_batch_size), device)
    if world > 1:
        dist.all_reduce(meter.matrix, op=dist.ReduceOp.SUM)
    return meter


def _log_evaluation(logger: RunLogger, method, cfg: ExperimentConfig, data, device, ious: list[float], step: int) -> None:
    """Per-class IoU table and prediction overlays on a fixed handful of validation images."""
    logger.text(iou_table(cfg.data.names, ious), f"eval/iou_step_{step:08d}.csv")
    shown = next(eval_batches(data.val[:_OVERLAY_IMAGES], cfg, _OVERLAY_IMAGES))
    predictions = []
    run_evaluation(method, cfg, [shown], device, on_prediction=lambda _, pred: predictions.append(pred.cpu()))
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    grid = overlay_grid(shown["image"].numpy(), predictions[0].numpy(), shown["mask"].numpy(), palette)
    logger.image(grid, f"eval/overlay_step_{step:08d}.png")


_OVERLAY_IMAGES = 4


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    checkpoint = ray.train.get_checkpoint() or loop_config.get("initial_checkpoint")
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    start_step = int(state["step"]) if state is not None else 0
    seen_draws: set = set()
    first_draw = cfg.method.unlabeled_from(start_step) * draws_per_step(cfg)
    # Opened first: its first batch waits for Ray Data's actors to start (seconds), meanwhile
    # this worker builds its model.
    unlabeled = _started(_unlabeled_batches(cfg, seen_draws, first_draw)) if cfg.method.uses_unlabeled else None
    mlflow_run = loop_config.get("mlflow")
    logger = RunLogger(mlflow_run["uri"], mlflow_run["run_id"]) if mlflow_run and rank == 0 else None
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    data = loop_config["data"]  # checked (and filtered) once, on the driver

    method = build_method(cfg).to(device)
    method.train()
    configure_threads(cfg, method, device)
    if world > 1:
        distribute_students(method, device)
    optimizer, scheduler = build_optimizer(method, cfg.train)
    scaler = torch.amp.GradScaler() if cfg.train.amp == "fp16" else None
    say = _console(loop_config, rank)
    beat = _heartbeat(loop_config, rank)
    gate = loop_config.get("decision_gate")
    topology = _topology(context, world, method)
    if world > 1:
        nodes = len({r["node_id"] for r in topology})
        say(f"{world} workers on {nodes} node(s): " + ", ".join(
            f"rank {r['world_rank']} = node {r['node_rank']} local {r['local_rank']}" for r in topology))
    if logger:
        logger.text(json.dumps(topology, indent=2), "topology.json")

    if state is not None:
        ckpt.restore(state, method, optimizer, scheduler, cfg.train)

    labeled = iter(endless_loader(data.labeled, cfg, True, cfg.data.labeled_batch_size, workers=cfg.data.labeled_workers,
                                  start_step=start_step, rank=rank))
    meter = ProgressMeter(cfg.train.iters, start_step, ranks=world)
    data_wait = 0.0

    last_step = cfg.train.last_step
    for step in range(start_step + 1, last_step + 1):
        waited_from = time.perf_counter()
        unlabeled_batch = next(unlabeled) if unlabeled and cfg.method.reads_unlabeled(step) else None
        labeled_batch = next(labeled)
        data_wait += time.perf_counter() - waited_from
        meter.count_skipped(unlabeled_batch)
        batch = to_batch(labeled_batch, unlabeled_batch, cfg, device)
        out = train_step(method, optimizer, scheduler, batch, cfg.train.amp, scaler)
        meter.add(out.metrics, batch.num_images)
        beat()
        if not is_report_step(step, cfg):
            continue
        if not _all_finite(meter, world, device):
            # Every rank reports the divergence and stops; the driver's DivergenceWatch ends the run.
            lr = optimizer.param_groups[0]["lr"]
            if logger:
                logger.metrics({"train/diverged_at_step": step}, step)
            ray.train.report({"step": step, DIVERGED: str(TrainingDiverged.at(step, lr))})
            return
        _broadcast_buffers(method, world)
        metrics = {"step": step}
        line = ""
        if step % cfg.train.log_interval == 0 or step == cfg.train.iters:
            values = meter.summary(step)
            values["data_wait_fraction"] = data_wait / max(values["seconds_per_iter"] * cfg.train.log_interval, 1e-9)
            data_wait = 0.0
            metrics.update({f"train/{k}": v for k, v in values.items() if k != "eta_s"})
            metrics["data/skipped"] = _sum_over_ranks(meter.skipped, world, device)
            line = ProgressMeter.line(step, cfg.train.iters, values)
        if step % cfg.train.eval_interval == 0 or step == cfg.train.iters:
            iou = _evaluate_sharded(method, cfg, data, device, rank, world)
            metrics["val/miou"] = iou.miou()
            metrics.update({f"val/iou/{name}": v for name, v in zip(cfg.data.names, iou.per_class())})
            metrics.update(_consistency_metrics(method, seen_draws, world))
            line = f"{line or f'step {step}/{cfg.train.iters}'}  val mIoU {metrics['val/miou']:.2f}"
            if logger:
                _log_evaluation(logger, method, cfg, data, device, iou.per_class(), step)
        if line:
            say(line)
        if logger:
            logger.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if cfg.train.checkpoint_due(step):
            _report_with_checkpoint(metrics, cfg, method, optimizer, scheduler, rank, step)
            if gate is not None and step < cfg.train.iters:
                _wait_for_decision(gate, cfg, step)
        else:
            ray.train.report(metrics)


def _console(loop_config: dict, rank: int):
    """Rank 0's way to the user: the driver's progress board (see mkd_ray.console), which
    prints each line once; stdout where a caller gave no board. Other ranks stay silent."""
    board, run = loop_config.get("board"), loop_config.get("run_label", "")
    if rank != 0:
        return lambda text: None
    if board is None:
        return lambda text: print(text, flush=True)
    return lambda text: board.post.remote(run, text)


def _heartbeat(loop_config: dict, rank: int):
    """Rank 0 tells the driver's stall watch that steps are being made, between log lines."""
    board = loop_config.get("board")
    if rank != 0 or board is None:
        return lambda: None
    return Heartbeat(lambda: board.beat.remote())


def _all_finite(meter: ProgressMeter, world: int, device) -> bool:
    """Whether every rank's losses stayed finite (all ranks must agree, to stop together)."""
    flag = meter.finite_flag().to(device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def _sum_over_ranks(value: float, world: int, device) -> float:
    if world == 1:
        return float(value)
    total = torch.tensor(float(value), device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(total)
    return total.item()


def _wait_for_decision(gate, cfg: ExperimentConfig, step: int) -> None:
    """Under PBT, train on from a checkpointed evaluation only once Tune has let the trial go
    on: a trial that Tune pauses, or hands another trial's weights, would otherwise train
    steps that its restart from this checkpoint throws away (and a short run could finish
    before the decision). Each rank takes one of the tokens the trial puts in `gate`."""
    try:
        gate.get(timeout=cfg.train.stall_timeout_s or None)
    except queue.Empty:
        raise TimeoutError(f"step {step}: the training workers waited {cfg.train.stall_timeout_s:g} s "
                           "(train.stall_timeout_s) for Tune's decision on this evaluation") from None


def _report_with_checkpoint(metrics, cfg, method, optimizer, scheduler, rank: int, step: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            ckpt.save_checkpoint(Path(tmp), cfg, method, optimizer, scheduler)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")
