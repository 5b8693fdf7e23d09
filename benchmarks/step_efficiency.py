"""step_efficiency: one MKD iteration against the sum of its irreducible parts, each timed
alone on the same batch, and what a naive step (a forward per loss term) costs.

    .venv/bin/python benchmarks/step_efficiency.py [--repeats 3] [--iters 30] [--smoke]

Parts: each student's forward+backward on its concatenated labeled + strong batch, each
teacher's forward on the weak batch, the EMA update of the teachers and the optimizer step.
Parts, back-to-back and naive steps run at --threads torch threads. ratio = full step / sum
of parts (goal <= 1.10), with the full step run as the trainer runs it: on a CPU of 2+
threads the two branches side by side at half the threads each (`train.parallel_branches`),
which wins back more than the losses, thresholds, CutMix mixing and ISDA add.
branches_in_turn_ratio: the same with one branch after the other. naive_ratio = naive step /
full step in turn. back_to_back_ratio = the same parts run one after another as one step
(plain cross-entropy, no method code) / sum of parts: what running four networks in a row
costs over timing each alone (caches, allocator), which no change to the loss code can remove.
"""

from __future__ import annotations

import time

from _common import FULL_STEP, REPO, emit, harness_parser, median
from step_overhead import _batches

GOAL = 1.10


def _timed(fn, iters: int) -> float:
    """Median seconds of `fn` over `iters` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return median(samples)


def measure(cfg, batch, iters: int) -> dict:
    """Parts, back-to-back and the naive step at `train.threads`; the full step both as the
    trainer runs it (`configure_threads`: the branches side by side) and one branch at a time."""
    import torch
    import torch.nn.functional as F

    from mkd_ray.engine import build_method, configure_threads
    from mkd_ray.method import build_optimizer, train_step
    from mkd_ray.method.mkd import _mix

    threads = cfg.train.threads
    torch.set_num_threads(threads)
    method = build_method(cfg)
    method.train()
    optimizer, scheduler = build_optimizer(method, cfg.train)
    students_in = torch.cat([batch.x_l, _mix(batch.cutmix, batch.x_s)])
    target = torch.cat([batch.y_l, batch.y_l.new_zeros(batch.x_s.shape[0], *batch.y_l.shape[1:])])

    def student_loss(i):
        return F.cross_entropy(method.students[i](students_in)["logits"], target, ignore_index=255)

    def student_part(i):
        def run():
            optimizer.zero_grad(set_to_none=True)
            student_loss(i).backward()
        return run

    def teacher_part(i):
        def run():
            with torch.inference_mode():  # as the step runs its teachers
                method.teachers[i](batch.x_w)
        return run

    parts = {f"student{i + 1}_fwd_bwd": _timed(student_part(i), iters) for i in range(2)}
    parts.update({f"teacher{i + 1}_fwd": _timed(teacher_part(i), iters) for i in range(2)})
    parts["ema_update"] = _timed(method.update_teachers, iters)
    student_part(0)(), student_part(1)()  # gradients in place, as the step leaves them
    parts["optimizer_step"] = _timed(optimizer.step, iters)

    def back_to_back():
        method.update_teachers()
        for i in range(2):
            teacher_part(i)()
        optimizer.zero_grad(set_to_none=True)
        (student_loss(0) + student_loss(1)).backward()
        optimizer.step()

    in_a_row = _timed(back_to_back, iters)
    one_after_another = _timed(lambda: train_step(method, optimizer, scheduler, batch), iters)
    naive = _timed(lambda: naive_step(method, optimizer, batch), iters)
    # Last, as it leaves the process at threads // 2 torch threads per thread.
    configure_threads(cfg, method, torch.device("cpu"))
    full = _timed(lambda: train_step(method, optimizer, scheduler, batch), iters)
    torch.set_num_threads(threads)
    return {"parts_s": parts, "sum_of_parts_s": sum(parts.values()), "back_to_back_s": in_a_row,
            "full_step_s": full, "full_step_branches_in_turn_s": one_after_another, "naive_step_s": naive,
            "branches_side_by_side": method.branches.is_parallel}


def naive_step(method, optimizer, batch) -> None:
    """The same losses with a forward per term: labeled and strong images through each student
    separately, and the strong images again for the student<->student term."""
    import torch
    import torch.nn.functional as F

    from mkd_ray.method.mkd import _mix

    method.update_teachers()
    x_mix = _mix(batch.cutmix, batch.x_s)
    with torch.no_grad():
        targets = [method._teacher_targets(t, batch, 0.0) for t in range(2)]
    loss = batch.x_l.new_zeros(())
    for i, student in enumerate(method.students):
        loss = loss + F.cross_entropy(student(batch.x_l)["logits"], batch.y_l, ignore_index=255)
        conf, label = targets[1 - i]
        pixel = F.cross_entropy(student(x_mix)["logits"], label, reduction="none")
        loss = loss + (pixel * (conf >= method.cfg.tau_t)).mean()
        with torch.no_grad():
            other = method.students[1 - i](x_mix)["logits"].argmax(1)
        loss = loss + F.cross_entropy(student(x_mix)["logits"], other)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = harness_parser(__doc__)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from mkd_ray.config import load_config
    from mkd_ray.engine import to_batch

    overrides = [f"data.root={REPO / 'data' / 'synthetic'}", FULL_STEP, f"train.threads={args.threads}"]
    if args.smoke:
        overrides += ["model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32"]
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", overrides)
    repeats, iters = (1, 2) if args.smoke else (args.repeats, args.iters)
    labeled, unlabeled = _batches(cfg, 1)[0]
    batch = to_batch(labeled, unlabeled, cfg, torch.device("cpu"))
    runs = [measure(cfg, batch, iters) for _ in range(repeats)]
    ratio = median([r["full_step_s"] / r["sum_of_parts_s"] for r in runs])
    emit({"name": "step_efficiency", "ratio": ratio, "goal": GOAL, "meets_goal": ratio <= GOAL, "smoke": args.smoke,
          "naive_ratio": median([r["naive_step_s"] / r["full_step_branches_in_turn_s"] for r in runs]),
          "branches_in_turn_ratio": median([r["full_step_branches_in_turn_s"] / r["sum_of_parts_s"] for r in runs]),
          "back_to_back_ratio": median([r["back_to_back_s"] / r["sum_of_parts_s"] for r in runs]), "runs": runs,
          "threads": args.threads})


if __name__ == "__main__":
    main()
