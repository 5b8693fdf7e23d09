"""Known-answer tests of the method core on hand-built tensors (no Ray, no MLflow)."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mkd_ray.config import MethodConfig
from mkd_ray.method import Batch, MutualKD, build_optimizer, train_step
from mkd_ray.method.ema import ema_decay_at, ema_update
from mkd_ray.method.isda import ClassFeatureStats, augment_logits, nearest_resize
from mkd_ray.method.losses import class_max, cosine_rampup, masked_cross_entropy, pseudo_labels, sigmoid_rampup
from mkd_ray.method.mkd import _mix, to_strong_view
from mkd_ray.method.selection import DistributionAligner, KnowledgeSelector
from tests.conftest import TinySeg

C = 3


def make_method(**overrides) -> MutualKD:
    fields = dict(feature_aug="none", lambda_st=1.0, lambda_ss=0.0, tau_t=0.0, tau_s=0.0)
    fields.update(overrides)
    return MutualKD(MethodConfig(**fields), lambda i: TinySeg(C), C, total_iters=100)


def set_classifier(net, favoured: int, strength: float = 10.0) -> None:
    """Make a TinySeg predict `favoured` everywhere (bias only, weights zero)."""
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.bias[favoured] = strength


def tiny_batch(b_l=2, b_u=2, hw=4, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        x_l=torch.randn(b_l, 3, hw, hw, generator=g),
        y_l=torch.randint(0, C, (b_l, hw, hw), generator=g),
        x_w=torch.randn(b_u, 3, hw, hw, generator=g),
        x_s=torch.randn(b_u, 3, hw, hw, generator=g),
        ignore_u=torch.zeros(b_u, hw, hw, dtype=torch.bool),
        cutmix=torch.zeros(b_u, hw, hw, dtype=torch.bool),
        y_u=torch.randint(0, C, (b_u, hw, hw), generator=g),
    )


# ----------------------------------------------------------------------------- losses


def test_masked_cross_entropy_normalisers():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2 classes, 1, 2 pixels)
    target = torch.tensor([[[0, 0]]])
    keep = torch.tensor([[[True, False]]])
    valid = torch.tensor([[[True, True]]])
    ce0 = math.log(1 + math.exp(-2.0))  # pixel 0, class 0 has logit 2
    assert masked_cross_entropy(logits, target, keep, valid, "passed").item() == pytest.approx(ce0)
    assert masked_cross_entropy(logits, target, keep, valid, "valid").item() == pytest.approx(ce0 / 2)
    nothing = torch.zeros_like(keep)
    assert masked_cross_entropy(logits, target, nothing, valid, "passed").item() == 0.0


def test_class_max_matches_torch_max_with_ties():
    torch.manual_seed(0)
    scores = torch.randn(3, 7, 5, 4)
    scores[0, 2] = scores[0, 5] = 9.0  # a tie: the first class wins, as in torch.max
    scores[1, :, 0, 0] = 0.0  # all equal
    for x in (scores, scores.round(), scores[:, :, 0]):
        values, indices = class_max(x)
        expected = x.max(dim=1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_pseudo_labels_and_threshold_mask():
    logits = torch.log(torch.tensor([[0.7, 0.2], [0.3, 0.8]])).reshape(1, 2, 1, 2)  # probs per pixel
    conf, label = pseudo_labels(logits)
    assert label.tolist() == [[[0, 1]]]
    assert conf.squeeze().tolist() == pytest.approx([0.7 / 1.0, 0.8 / 1.0], rel=1e-5)
    selector = KnowledgeSelector(2, tau=0.75)
    keep = selector.select(conf, label, torch.ones_like(label, dtype=torch.bool))
    assert keep.tolist() == [[[False, True]]]


def test_class_adaptive_thresholds_lower_rare_classes_with_floor():
    sel = KnowledgeSelector(3, tau=0.9, mode="class_adaptive", floor=0.5, momentum=0.0)
    conf = torch.full((1, 1, 4), 0.95)
    label = torch.tensor([[[0, 0, 0, 1]]])
    sel.select(conf, label, torch.ones_like(label, dtype=torch.bool))
    thr = sel.thresholds()
    # class 0: beta = 1 -> 0.9 * 1 / (2 - 1) = 0.9; class 1: beta = 1/3 -> 0.9 * (1/3) / (5/3) = 0.18 -> floor 0.5
    assert thr.tolist() == pytest.approx([0.9, 0.5, 0.5])


def test_distribution_alignment_pulls_pseudo_labels_towards_the_labeled_class_shares():
    aligner = DistributionAligner(2, momentum=0.5)
    probs = torch.tensor([[0.8, 0.6], [0.2, 0.4]]).reshape(1, 2, 1, 2)  # two pixels
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    assert torch.equal(aligner.align(0, probs, valid), probs)  # no labels seen yet: unchanged
    aligner.observe_labels(torch.tensor([0, 0, 1, 1, 255]))  # ignore is not counted
    assert aligner.label_counts.tolist() == [2, 2]
    aligned = aligner.align(0, probs, valid, update=False)  # the mean is still the first call's
    assert aligner.predicted_mean[0].tolist() == pytest.approx([0.7, 0.3])
    # pixel 0: (0.8 * 0.5/0.7, 0.2 * 0.5/0.3) normalised; pixel 1 flips to class 1.
    assert aligned[0, :, 0, 0].tolist() == pytest.approx([0.6316, 0.3684], abs=1e-4)
    assert aligned[0, :, 0, 1].tolist() == pytest.approx([0.3913, 0.6087], abs=1e-4)
    aligner.align(0, torch.tensor([[1.0], [0.0]]).reshape(1, 2, 1, 1), valid[..., :1])  # EMA at momentum 0.5
    assert aligner.predicted_mean[0].tolist() == pytest.approx([0.85, 0.15])


def test_distribution_alignment_relabels_what_the_teacher_over_predicts():
    method = make_method(name="mean_teacher", distribution_alignment=True)
    set_classifier(method.teachers[0], favoured=0, strength=1.0)  # probs (0.58, 0.21, 0.21) everywhere
    batch = tiny_batch()
    batch.y_l.fill_(1)  # the labeled masks hold class 1 only
    out = method.compute_losses(batch)
    # Aligned: 0.58 * 0 / 0.58, 0.21 * 1 / 0.21, 0 -> class 1 with confidence 1.
    assert out.metrics["loss_st"].item() == pytest.approx(_expected_ce(method.students[0], batch, 1).item(), rel=1e-5)
    assert method.aligner.label_counts.tolist() == [0, batch.y_l.numel(), 0]


def test_warmup_steps_count_labeled_classes_for_alignment_without_reading_teachers():
    method = make_method(name="mkd", distribution_alignment=True, warmup_iters=5)
    method.compute_losses(tiny_batch())
    assert method.aligner.predicted_mean.shape == (2, C)  # one running mean per teacher
    assert method.aligner.label_counts.sum() == tiny_batch().y_l.numel() and not method.aligner.predicted_mean.any()


def test_warmup_delays_the_ramp_of_the_unsupervised_weight():
    method = MutualKD(MethodConfig(rampup_iters=100, warmup_iters=40), lambda i: TinySeg(), 3, 1000)
    for step, weight in [(0, 0.0), (39, 0.0), (40, math.exp(-5)), (90, math.exp(-5 * 0.25)), (140, 1.0)]:
        method.iteration.fill_(step)
        assert method.unsup_weight() == pytest.approx(weight), step


def test_ramps():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    assert cosine_rampup(0, 10, 1.5) == 0.0
    assert cosine_rampup(5, 10, 1.5) == pytest.approx(0.75)
    assert cosine_rampup(10, 10, 1.5) == pytest.approx(1.5)


# ----------------------------------------------------------------------------- EMA


def test_ema_warmup_and_update():
    assert ema_decay_at(0, 0.99) == 0.0
    assert ema_decay_at(1, 0.99) == 0.5
    assert ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(10_000, 0.99) == 0.99
    teacher, student = torch.nn.BatchNorm2d(1), torch.nn.BatchNorm2d(1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(2.0)
    ema_update(teacher, student, 0.75, "ema")
    assert teacher.weight.item() == pytest.approx(0.75 * 1 + 0.25 * 3)
    assert teacher.running_mean.item() == pytest.approx(0.25 * 2)
    ema_update(teacher, student, 0.75, "copy")
    assert teacher.running_mean.item() == 2.0
    teacher.running_mean.fill_(-1.0)
    ema_update(teacher, student, 0.75, "none")
    assert teacher.running_mean.item() == -1.0


def test_teacher_follows_student_at_step_zero():
    method = make_method(name="mkd")
    with torch.no_grad():
        method.students[0].classifier.weight.add_(1.0)
    method.update_teachers()  # iteration 0 -> decay 0 -> exact copy
    assert torch.equal(method.teachers[0].classifier.weight, method.students[0].classifier.weight)


# ----------------------------------------------------------------------------- cross distillation


def _expected_ce(student, batch, target_class):
    logits = student(batch.x_s)["logits"]
    return F.cross_entropy(logits, torch.full(logits.shape[:1] + logits.shape[2:], target_class))


def test_each_student_learns_from_the_other_branch_teacher():
    method = make_method(name="mkd")
    set_classifier(method.teachers[0], favoured=0)
    set_classifier(method.teachers[1], favoured=1)
    batch = tiny_batch()
    out = method.compute_losses(batch)
    expected = _expected_ce(method.students[0], batch, 1) + _expected_ce(method.students[1], batch, 0)
    assert out.metrics["loss_st"].item() == pytest.approx(expected.item(), rel=1e-5)
    wrong = _expected_ce(method.students[0], batch, 0) + _expected_ce(method.students[1], batch, 1)
    assert abs(wrong.item() - expected.item()) > 1e-3


def test_mean_teacher_learns_from_its_own_teacher():
    method = make_method(name="mean_teacher")
    set_classifier(method.teachers[0], favoured=2)
    batch = tiny_batch()
    out = method.compute_losses(batch)
    assert out.metrics["loss_st"].item() == pytest.approx(_expected_ce(method.students[0], batch, 2).item(), rel=1e-5)


def test_student_student_term_uses_the_other_students_argmax():
    method = make_method(name="cps", lambda_ss=1.0)
    set_classifier(method.students[0], favoured=0, strength=2.0)
    set_classifier(method.students[1], favoured=2, strength=3.0)
    batch = tiny_batch()
    out = method.compute_losses(batch)
    expected = _expected_ce(method.students[0], batch, 2) + _expected_ce(method.students[1], batch, 0)
    assert out.metrics["loss_ss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["loss_st"].item() == 0.0


def test_threshold_drops_unconfident_teacher_pixels():
    method = make_method(name="mkd", tau_t=0.95)
    set_classifier(method.teachers[0], favoured=0, strength=1.0)  # softmax max ~0.58 < 0.95
    set_classifier(method.teachers[1], favoured=1, strength=10.0)  # ~1.0
    out = method.compute_losses(tiny_batch())
    assert out.metrics["mask_ratio"].item() == pytest.approx(0.5)  # only T2's pixels (for S1) pass


def test_supervised_loss_sums_both_students():
    method = make_method(name="mkd", lambda_st=0.0)
    batch = tiny_batch()
    out = method.compute_losses(batch)
    expected = sum(F.cross_entropy(s(batch.x_l)["logits"], batch.y_l) for s in method.students)
    assert out.metrics["loss_sup"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_supervised_baseline_ignores_unlabeled_images():
    method = make_method(name="supervised")
    assert len(method.students) == 1 and len(method.teachers) == 0 and not method.uses_unlabeled
    b = tiny_batch()
    out = method.compute_losses(Batch.labeled_only(b.x_l, b.y_l))
    assert out.metrics["loss_st"].item() == 0.0 and out.metrics["loss_ss"].item() == 0.0


# ----------------------------------------------------------------------------- CutMix


def test_cutmix_pseudo_labels_come_from_the_pixels_source_image():
    method = make_method(name="mean_teacher")
    # Teacher predicts class = sign of the first input channel; image 0 positive, image 1 negative.
    with torch.no_grad():
        w = method.teachers[0].classifier.weight
        w.zero_()
        method.teachers[0].classifier.bias.zero_()
        w[0, 0], w[1, 0] = 20.0, -20.0
    batch = tiny_batch(b_u=2, hw=4)
    batch.x_w[0, 0], batch.x_w[1, 0] = 1.0, -1.0
    batch.cutmix[0, :2, :2] = True  # top-left of image 0 pasted from its partner (image 1)
    conf, label = method._teacher_targets(0, batch, lam=0.0)
    assert label[0, :2, :2].eq(1).all() and label[0, 2:, :].eq(0).all()
    assert label[1].eq(1).all()
    mixed = _mix(batch.cutmix, batch.x_s)
    assert torch.equal(mixed[0, :, :2, :2], batch.x_s[1, :, :2, :2])
    assert torch.equal(mixed[0, :, 2:, :], batch.x_s[0, :, 2:, :])


def test_oracle_learns_from_the_mixed_ground_truth():
    method = make_method(name="oracle")
    assert len(method.students) == 1 and not method.teachers and method.uses_unlabeled
    batch = tiny_batch(b_u=2, hw=4)
    batch.cutmix[0, :2, :2] = True  # top-left of image 0 pasted from image 1
    batch.y_u[1, 0, 0] = 255  # unknown truth: no target there
    out = method.compute_losses(batch)
    truth = batch.y_u.clone()
    truth[0, :2, :2] = batch.y_u[1, :2, :2]
    logits = method.students[0](_mix(batch.cutmix, batch.x_s))["logits"]
    expected = F.cross_entropy(logits, truth, ignore_index=255)
    assert out.metrics["loss_st"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["pseudo_acc"].item() == 1.0


def test_warped_strong_view_carries_its_pseudo_labels_and_padding_along():
    """A one-pixel shift: the student's pixel j sees weak pixel j + 1, so its pseudo-label is
    the teacher's label of weak pixel j + 1, and the column shifted in from outside is invalid."""
    method = make_method(name="mean_teacher")
    with torch.no_grad():  # the teacher labels a pixel 0 where channel 0 is positive, else 1
        w = method.teachers[0].classifier.weight
        w.zero_()
        method.teachers[0].classifier.bias.zero_()
        w[0, 0], w[1, 0] = 20.0, -20.0
    batch = tiny_batch(b_u=2, hw=4)
    batch.x_s = batch.x_w.clone()
    batch.warp = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]).repeat(2, 1, 1)  # 0.5 = one pixel of 4
    _, label = method._teacher_targets(0, batch, lam=0.0)
    student_view = to_strong_view(batch, batch.x_s)
    valid = to_strong_view(batch, ~batch.ignore_u)
    assert torch.allclose(student_view[..., :3], batch.x_s[..., 1:])
    assert torch.equal(label[..., :3], (batch.x_w[:, 0, :, 1:] <= 0).long())
    assert valid[..., :3].all() and not valid[..., 3].any()


def test_identity_warp_changes_no_loss():
    method = make_method(name="mkd", lambda_ss=1.0, feature_aug="isda")
    plain = tiny_batch(seed=3)
    warped = tiny_batch(seed=3)
    warped.warp = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(2, 1, 1)
    method.iteration.fill_(50)
    a = method.compute_losses(plain).metrics
    method_b = make_method(name="mkd", lambda_ss=1.0, feature_aug="isda")
    method_b.load_state_dict(method.state_dict())
    b = method_b.compute_losses(warped).metrics
    for key in ("loss", "loss_sup", "loss_st", "loss_ss", "mask_ratio"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key


# ----------------------------------------------------------------------------- ISDA


def test_isda_logit_offsets_match_formula():
    stats = ClassFeatureStats(2, 2)
    stats.var.copy_(torch.tensor([[1.0, 2.0], [0.5, 0.0]]))
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(2, 2, 1, 1)
    a = stats.logit_offsets(w, lam=1.0)
    # A[y=0, j=1] = 0.5 * ((0-1)^2 * 1 + (2-0)^2 * 2) = 4.5 ; A[y=1, j=0] = 0.5 * ((1-0)^2 * 0.5 + (0-2)^2 * 0) = 0.25
    assert torch.allclose(a, torch.tensor([[0.0, 4.5], [0.25, 0.0]]))
    logits = torch.zeros(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    aug = augment_logits(logits, labels, a)
    assert aug[0, :, 0, 0].tolist() == pytest.approx([0.0, 4.5])
    assert aug[0, :, 0, 1].tolist() == pytest.approx([0.25, 0.0])
    assert aug[0, :, 0, 2].tolist() == [0.0, 0.0]


def test_isda_estimator_matches_batch_statistics():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 2, (2, 4, 4))
    labels[0, 0, 0] = 255
    stats = ClassFeatureStats(2, 3)
    stats.update(feats[:1], labels[:1])
    stats.update(feats[1:], labels[1:])
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    lab = labels.reshape(-1)
    for c in range(2):
        sel = flat[lab == c]
        assert stats.count[c].item() == len(sel)
        assert torch.allclose(stats.mean[c], sel.mean(0), atol=1e-5)
        assert torch.allclose(stats.var[c], sel.var(0, unbiased=False), atol=1e-5)


def test_isda_label_resize_matches_interpolate():
    # The strided shortcut must pick the pixels F.interpolate's nearest mode picks.
    labels = torch.randint(0, 5, (2, 32, 24))
    for size in [(8, 6), (16, 12), (32, 24), (10, 7)]:
        expected = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        assert torch.equal(nearest_resize(labels, size), expected), size


def test_isda_statistics_skip_non_finite_features():
    # An fp16 overflow (a step the GradScaler skips) must not poison the running statistics.
    torch.manual_seed(0)
    feats, labels = torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    clean, hit = ClassFeatureStats(1, 3), ClassFeatureStats(1, 3)
    clean.update(feats[..., 1:], labels[..., 1:])
    overflowed = feats.clone()
    overflowed[0, 1, :, 0] = float("inf")
    overflowed[0, 2, 0, 0] = float("nan")
    hit.update(overflowed, labels)
    for name in ("mean", "var", "count"):
        torch.testing.assert_close(getattr(hit, name), getattr(clean, name), msg=name)


def test_isda_changes_student_loss_and_keeps_gradients():
    method = make_method(name="mkd", feature_aug="isda", lam_max=2.0, lambda_ss=1.0)
    method.iteration.fill_(100)  # full strength
    batch = tiny_batch()
    for _ in range(2):  # first call fills the statistics
        out = method.compute_losses(batch)
    plain = make_method(name="mkd", lambda_ss=1.0)
    plain.load_state_dict({k: v for k, v in method.state_dict().items() if k in plain.state_dict()})
    assert out.metrics["loss_sup"].item() > plain.compute_losses(batch).metrics["loss_sup"].item()
    out.loss.backward()
    assert method.students[0].classifier.weight.grad is not None


def test_feature_dropout_stream_is_averaged_into_the_teacher_term():
    method = make_method(name="mean_teacher", feature_aug="dropout", fp_dropout=0.5)
    out = method.compute_losses(tiny_batch())
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- one optimizer step


def test_train_step_updates_students_not_teachers_by_gradient():
    from mkd_ray.config import TrainConfig

    method = make_method(name="mkd", lambda_ss=1.0)
    optimizer, scheduler = build_optimizer(method, TrainConfig(iters=10, lr=0.1))
    before_s = method.students[0].classifier.weight.clone()
    out = train_step(method, optimizer, scheduler, tiny_batch())
    assert int(method.iteration) == 1
    assert not torch.equal(before_s, method.students[0].classifier.weight)
    assert all(p.grad is None for p in method.teachers.parameters())
    # poly: after one of 10 steps the lr factor is (1 - 1/10) ** 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**0.9)
    assert set(out.metrics) >= {"loss", "loss_sup", "loss_st", "loss_ss", "mask_ratio", "pseudo_acc", "lr"}


@pytest.mark.parametrize("name,amp,aligned", [("mkd", "off", False), ("cps", "off", False), ("mkd", "bf16", False),
                                              ("mkd", "off", True)])
def test_branches_side_by_side_train_exactly_as_in_turn(name, amp, aligned):
    # At one torch thread per branch, side by side runs the very ops of one-at-a-time on one
    # thread, so any difference is a bug: grad mode or autocast lost in a worker thread, or a
    # gradient that crossed branches. bf16 checks that autocast reaches the workers.
    from mkd_ray.config import TrainConfig

    def trained(side_by_side: bool):
        torch.manual_seed(0)
        method = make_method(name=name, feature_aug="isda", lambda_ss=1.0, tau_t=0.4, tau_s=0.4,
                             distribution_alignment=aligned)  # aligned: both teachers share one aligner
        if side_by_side:
            method.branches.parallel(1)
        method.train()
        optimizer, scheduler = build_optimizer(method, TrainConfig(iters=10, lr=0.5))
        outs = [train_step(method, optimizer, scheduler, tiny_batch(seed=seed), amp) for seed in range(4)]
        return method.state_dict(), outs[-1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (in_turn, out_a), (side_by_side, out_b) = trained(False), trained(True)
    finally:
        torch.set_num_threads(threads)
    assert len(out_a.backward_parts) == 1 and len(out_b.backward_parts) == 2
    assert out_b.metrics["loss_ss"] > 0 and (name == "cps" or out_b.metrics["loss_st"] > 0)
    assert in_turn.keys() == side_by_side.keys()
    assert all(torch.equal(in_turn[k], side_by_side[k]) for k in in_turn), "the branches diverged"
    assert torch.equal(out_a.loss, out_b.loss)


def test_a_copied_side_by_side_method_runs_side_by_side_and_leaves_the_process_threads():
    import copy

    threads = torch.get_num_threads()
    method = make_method(name="mkd")
    try:
        method.branches.parallel(1)
        torch.set_num_threads(2)  # a process whose threads differ from the runner's
        copied = copy.deepcopy(method)
        assert torch.get_num_threads() == 2
        assert copied.branches.is_parallel and copied.branches.threads_each == 1
        names = copied.branches.map(lambda _: threading.current_thread().name, range(2))
        assert all(name.startswith("mkd-branch") for name in names)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_an_overflow_step_the_grad_scaler_skips_changes_nothing(optimizer):
    # fp16: the GradScaler skips a step whose gradients overflowed. A fused SGD would still
    # allocate its momentum there without filling it, and the next step would read that memory.
    from mkd_ray.config import TrainConfig

    def step_with_gradients(opt, scaler, value):
        for p in (p for group in opt.param_groups for p in group["params"]):
            p.grad = torch.full_like(p, value * scaler.get_scale())  # as a scaled backward leaves them
        scaler.step(opt)
        scaler.update()

    runs = []
    for first_gradient in (float("inf"), None):
        torch.manual_seed(0)
        method = make_method(name="mkd")
        opt, _ = build_optimizer(method, TrainConfig(iters=10, lr=0.1, optimizer=optimizer, amp="fp16"))
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
        scaler.scale(torch.ones(()))  # starts the scaler's bookkeeping
        if first_gradient is not None:
            before = [p.detach().clone() for p in method.students.parameters()]
            step_with_gradients(opt, scaler, first_gradient)
            assert all(torch.equal(b, p) for b, p in zip(before, method.students.parameters()))
            assert all(state.get("momentum_buffer") is None for state in opt.state.values())
        step_with_gradients(opt, scaler, 1.0)
        runs.append([p.detach().clone() for p in method.students.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_restored_optimizer_follows_the_new_configs_learning_rate():
    # PBT continues a trial's weights under a perturbed learning rate: the poly schedule must
    # go on from the restored step with the new base rate, not the saved one.
    from mkd_ray.config import TrainConfig
    from mkd_ray.method.optim import apply_train_config

    method = make_method(name="mkd")
    optimizer, scheduler = build_optimizer(method, TrainConfig(iters=10, lr=0.1, head_lr_mult=10.0))
    for _ in range(3):
        train_step(method, optimizer, scheduler, tiny_batch())
    saved = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = build_optimizer(method, TrainConfig(iters=10, lr=0.02, head_lr_mult=10.0, weight_decay=0.5))
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.7**0.9)  # the saved rate wins on load...
    apply_train_config(optimizer, scheduler, TrainConfig(iters=10, lr=0.02, head_lr_mult=10.0, weight_decay=0.5))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 * 0.7**0.9, 0.2 * 0.7**0.9])
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    train_step(method, optimizer, scheduler, tiny_batch())  # ...and the schedule continues from the new one
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.2 * 0.6**0.9)


def test_pseudo_label_accuracy_diagnostic():
    method = make_method(name="mean_teacher")
    set_classifier(method.teachers[0], favoured=1)
    batch = tiny_batch()
    batch.y_u.fill_(1)
    batch.y_u[0, 0, 0] = 0
    out = method.compute_losses(batch)
    assert out.metrics["pseudo_acc"].item() == pytest.approx(31 / 32)


# ----------------------------------------------------------------------------- null-distillation control


class BatchNormSeg(nn.Module):
    """Conv -> BatchNorm -> ReLU -> classifier: batch statistics couple the images of a forward."""

    def __init__(self, seed: int, num_classes: int = C, dim: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x, fp_dropout: float = 0.0):
        features = self.body(x)
        return {"features": features, "logits": self.classifier(features)}

    def backbone_parameters(self):
        return list(self.body.parameters())

    def head_parameters(self):
        return list(self.classifier.parameters())


def _first_student_after(steps: int, **method_fields) -> dict[str, torch.Tensor]:
    from mkd_ray.config import TrainConfig

    cfg = MethodConfig(**{**dict(feature_aug="none", tau_t=0.5, tau_s=0.5, lambda_ss=1.0), **method_fields})
    method = MutualKD(cfg, lambda i: BatchNormSeg(seed=i), C, total_iters=steps)
    optimizer, scheduler = build_optimizer(method, TrainConfig(iters=steps, optimizer="adamw", lr=0.01))
    for step in range(steps):
        batch = tiny_batch(b_l=3, b_u=3, hw=6, seed=step)
        if not method.uses_unlabeled:
            batch = Batch.labeled_only(batch.x_l, batch.y_l)
        train_step(method, optimizer, scheduler, batch)
    # BatchNorm's running statistics are left out: only evaluation reads them, never a step.
    return {k: v for k, v in method.students[0].state_dict().items() if "running" not in k and "num_batches" not in k}


@pytest.mark.parametrize("name", ["mkd", "mean_teacher", "cps"])
def test_without_distillation_the_first_student_trains_as_supervised_training_does(name):
    # Unsupervised weights zero: the whole step runs (teachers, unlabeled forwards, selection)
    # but S1 sees the labeled batches supervised training sees, from the same initial weights,
    # so it must end with the same weights.
    supervised = _first_student_after(6, name="supervised")
    control = _first_student_after(6, name=name, lambda_st=0.0, lambda_ss=0.0)
    for key, value in supervised.items():
        torch.testing.assert_close(control[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # One concatenated forward normalises the labeled images by statistics that include the
    # unlabeled ones: the weights part ways from supervised training.
    joint = _first_student_after(6, name=name, lambda_st=0.0, lambda_ss=0.0, split_forward=False)
    assert max((joint[k] - v).abs().max().item() for k, v in supervised.items()) > 1e-3


def test_warmup_steps_are_supervised_steps_and_distillation_starts_after_them():
    supervised = _first_student_after(6, name="supervised")
    warmed = _first_student_after(6, name="mkd", warmup_iters=6)
    for key, value in supervised.items():
        torch.testing.assert_close(warmed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    later = _first_student_after(6, name="mkd", warmup_iters=3)
    assert max((later[k] - v).abs().max().item() for k, v in supervised.items()) > 1e-3


# ----------------------------------------------------------------------------- reference-fidelity switches


def test_isda_with_detached_weights_moves_only_the_features_gradient():
    # Reference (exp_semi3.py): the offsets read the classifier weights detached, so the weights'
    # gradient is that of a cross-entropy over logits plus constant offsets.
    torch.manual_seed(0)
    stats = ClassFeatureStats(C, 2)
    stats.var.copy_(torch.rand(C, 2) + 0.5)
    weight = torch.randn(C, 2, 1, 1, requires_grad=True)
    features, labels = torch.randn(2, 2, 3, 3), torch.randint(0, C, (2, 3, 3))

    def weight_grad(offsets):
        logits = F.conv2d(features, weight)
        return torch.autograd.grad(F.cross_entropy(augment_logits(logits, labels, offsets), labels), weight)[0]

    constant = stats.logit_offsets(weight, lam=1.0).detach()
    torch.testing.assert_close(weight_grad(stats.logit_offsets(weight, 1.0, detach_weight=True)), weight_grad(constant))
    assert (weight_grad(stats.logit_offsets(weight, 1.0)) - weight_grad(constant)).abs().max() > 1e-3


def _isda_method(**fields) -> MutualKD:
    """Mean teacher at full ISDA strength, the student favouring class 2 and the teacher
    class 1, both with non-zero weights (so ISDA's offsets are not zero)."""
    method = make_method(name="mean_teacher", feature_aug="isda", lam_max=4.0, **fields)
    method.iteration.fill_(method.total_iters)
    torch.manual_seed(0)
    for net, favoured in ((method.students[0], 2), (method.teachers[0], 1)):
        set_classifier(net, favoured, strength=3.0)
        with torch.no_grad():
            net.classifier.weight.copy_(torch.randn_like(net.classifier.weight))
    return method


@pytest.mark.parametrize("isda_target", ["pseudo_label", "own_argmax"])
def test_isda_target_of_unlabeled_pixels(isda_target):
    # Reference: a student's unlabeled pixels are augmented towards its own argmax; here by
    # default towards its training target (the teacher's label).
    method = _isda_method(isda_teachers=False, isda_unlabeled_target=isda_target)
    batch = tiny_batch()
    out = method.compute_losses(batch)
    student, teacher = method.students[0], method.teachers[0]
    offsets = method.feature_stats[0].logit_offsets(student.classifier.weight, method.isda_strength())
    logits = student(batch.x_s)["logits"]
    teacher_label = teacher(batch.x_w)["logits"].argmax(1)
    rows = logits.argmax(1) if isda_target == "own_argmax" else teacher_label
    expected = F.cross_entropy(augment_logits(logits, rows, offsets), teacher_label)
    assert out.metrics["loss_st"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_knowledge_selection_reads_the_teacher_confidence_before_or_after_isda():
    # Reference (exp_semi3.py): the confidence that selects pixels is the teacher's before ISDA.
    batch = tiny_batch(b_u=4, hw=6)
    ratios, expected = {}, {}
    for before in (True, False):
        method = _isda_method(select_before_isda=before)
        teacher = method.teachers[0]
        logits = teacher(batch.x_w)["logits"]
        tau = float(logits.softmax(1).amax(1).median())
        method.selectors[0].tau = tau
        ratios[before] = method.compute_losses(batch).metrics["mask_ratio"].item()
        offsets = method.feature_stats[1].logit_offsets(teacher.classifier.weight, method.isda_strength())
        conf = (logits if before else augment_logits(logits, logits.argmax(1), offsets)).softmax(1).amax(1)
        expected[before] = (conf >= tau).float().mean().item()
    assert ratios == pytest.approx(expected)
    assert abs(expected[True] - expected[False]) > 0.05


def test_distillation_at_a_coarser_scale_reads_resized_maps():
    # Reference (exp_semi3.py, exp_cps.py compute_semi_loss): student and teacher logits resized
    # bilinearly, the CutMix box by nearest neighbour, before pseudo-labels and losses.
    batch = tiny_batch(b_u=3, hw=8)
    batch.cutmix[0, 1:6, 2:7] = batch.cutmix[2, 4:, :3] = True
    student_input = _mix(batch.cutmix, batch.x_s)
    losses = {}
    for scale in (0.5, 1.0):
        method = make_method(name="mean_teacher", distill_scale=scale)
        torch.manual_seed(0)
        for net in (*method.students, *method.teachers):
            nn.init.normal_(net.classifier.weight)
        losses[scale] = method.compute_losses(batch).metrics["loss_st"].item()

        def at_scale(z):
            return F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)

        with torch.no_grad():
            box = batch.cutmix if scale == 1 else batch.cutmix[:, ::2, ::2]
            target = _mix(box, at_scale(method.teachers[0](batch.x_w)["logits"]).argmax(1))
            expected = F.cross_entropy(at_scale(method.students[0](student_input)["logits"]), target)
        assert losses[scale] == pytest.approx(expected.item(), rel=1e-5), scale
    assert abs(losses[0.5] - losses[1.0]) > 1e-3


def test_teachers_without_buffers_move_parameters_only_and_normalise_by_the_batch():
    # Reference (exp_cps.py momentum_update, teachers run in training mode): `bn_buffers=none`.
    cfg = MethodConfig(name="mean_teacher", feature_aug="none", bn_buffers="none")
    method = MutualKD(cfg, lambda i: BatchNormSeg(seed=i), C, total_iters=10).train()
    student, teacher = method.students[0], method.teachers[0]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.body[1].running_mean.add_(5.0)
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    params = {k: v.clone() for k, v in teacher.named_parameters()}
    method.iteration.fill_(5)
    method.update_teachers()
    decay = ema_decay_at(5, cfg.ema_decay)
    for k, v in teacher.named_parameters():
        torch.testing.assert_close(v, params[k] * decay + dict(student.named_parameters())[k] * (1 - decay))
    for k, v in teacher.named_buffers():
        assert torch.equal(v, buffers[k]), k
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        by_batch = F.batch_norm(teacher.body[0](x), None, None, teacher.body[1].weight, teacher.body[1].bias, training=True)
        expected = teacher.classifier(F.relu(by_batch))
        torch.testing.assert_close(teacher(x)["logits"], expected)
