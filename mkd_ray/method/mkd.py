"""Mutual Knowledge Distillation and its baselines as one PyTorch module.

`MutualKD` holds the students, their mean teachers and the per-network state (feature
statistics for ISDA, class-adaptive thresholds, the class statistics of
distribution alignment). `compute_losses` is the one step
function: batches in, total loss and diagnostics out. The baselines are the same code
with fewer networks:

    method        students  teachers  pseudo-labeller of student i
    supervised    1         0         -
    mean_teacher  1         1         its own teacher T_i
    cps           2         0         the other student (L_ss only)
    mkd           2         2         the OTHER branch's teacher T_(1-i), plus L_ss
    oracle        1         0         the unlabeled images' ground truth, through the same
                                      views and CutMix (a perfect pseudo-labeller: how much
                                      of the gap to all labels the augmentations let through)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from mkd_ray.config import MethodConfig
from mkd_ray.method.branches import BranchRunner
from mkd_ray.method.ema import ema_decay_at, ema_update
from mkd_ray.method.isda import ClassFeatureStats, augment_logits, nearest_resize
from mkd_ray.method.losses import (
    class_argmax,
    class_max,
    cosine_rampup,
    masked_cross_entropy,
    masked_nll,
    pseudo_labels,
    sigmoid_rampup,
    supervised_nll,
)
from mkd_ray.method.selection import DistributionAligner, KnowledgeSelector

ModelFactory = Callable[[int], nn.Module]

_LAYOUT = {  # name -> (students, teachers, crossed teachers)
    "supervised": (1, 0, False),
    "mean_teacher": (1, 1, False),
    "cps": (2, 0, False),
    "mkd": (2, 2, True),
    "oracle": (1, 0, False),
}


@dataclass
class Batch:
    """One training step's inputs, already normalised floats on the training device.

    x_l, y_l: labeled images (B_l, 3, H, W) and masks (B_l, H, W), 255 = ignore.
    x_w, x_s: weak and strong views of the unlabeled images (same geometry until `warp`).
    ignore_u: True where the unlabeled crop is padding.
    cutmix:   True where a pixel of the strong view is pasted from the partner image
              (the next image of the batch, cyclically).
    warp:     (B_u, 2, 3) affine per image, or None: the strong view is resampled through it
              before CutMix (see `to_strong_view`), and so are the teachers' targets.
    y_u:      ground truth of the unlabeled images if known (255 elsewhere); used only
              for the pseudo-label accuracy diagnostic.
    """

    x_l: torch.Tensor
    y_l: torch.Tensor
    x_w: torch.Tensor
    x_s: torch.Tensor
    ignore_u: torch.Tensor
    cutmix: torch.Tensor
    y_u: Optional[torch.Tensor] = None
    warp: Optional[torch.Tensor] = None

    @classmethod
    def labeled_only(cls, x_l: torch.Tensor, y_l: torch.Tensor) -> "Batch":
        """For steps that read no unlabeled images: the supervised baseline's, and warm-up steps."""
        empty = x_l[:0]
        no_pixels = y_l[:0].bool()
        return cls(x_l, y_l, empty, empty, no_pixels, no_pixels)

    @property
    def num_images(self) -> int:
        """Images read for this batch: labeled plus unlabeled (none in a labeled-only one)."""
        return self.x_l.shape[0] + self.x_w.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {k: (v.to(device, non_blocking=non_blocking) if v is not None else None) for k, v in vars(self).items()}
        return Batch(**moved)


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]  # detached scalars; .item() only when logging
    # What to back-propagate: the loss, or its per-student parts when the branches run side by side.
    backward_parts: list[torch.Tensor]


def _mix(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """CutMix: take pixels under `mask` (B, H, W) from the partner image (batch rolled by one);
    on a coarser map, under the mask resized by nearest neighbour (as the reference does)."""
    if mask.shape[-2:] != x.shape[-2:]:
        mask = nearest_resize(mask, x.shape[-2:])
    partner = x.roll(1, dims=0)
    m = mask if x.dim() == mask.dim() else mask[:, None]
    return torch.where(m, partner, x)


def _warp(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Resample (B, H, W) or (B, C, H, W) through per-image affines; labels, masks and
    confidences by nearest neighbour, images bilinearly; zero outside the source."""
    planes = x if x.dim() == 4 else x[:, None]
    grid = nn.functional.affine_grid(theta.to(torch.float32), list(planes.shape), align_corners=False)
    mode = "bilinear" if x.dim() == 4 else "nearest"
    out = nn.functional.grid_sample(planes.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(x.dtype) if x.dim() == 4 else out[:, 0].to(x.dtype)


def to_strong_view(batch: "Batch", x: torch.Tensor) -> torch.Tensor:
    """Weak-view geometry -> the student's strong view: the per-image warp, then CutMix.
    A pixel warped in from outside the image reads zero (False for masks)."""
    if batch.warp is not None:
        x = _warp(batch.warp, x)
    return _mix(batch.cutmix, x)


class MutualKD(nn.Module):
    def __init__(
        self,
        cfg: MethodConfig,
        make_model: ModelFactory,
        num_classes: int,
        total_iters: int,
        ignore_index: int = 255,
        feature_dim: Optional[int] = None,
    ):
        super().__init__()
        self.cfg, self.num_classes, self.total_iters, self.ignore_index = cfg, num_classes, total_iters, ignore_index
        n_students, n_teachers, self.crossed = _LAYOUT[cfg.name]
        # Distinct seeds: the two branches must start from different random weights.
        self.students = nn.ModuleList(make_model(i) for i in range(n_students))
        self.teachers = nn.ModuleList(copy.deepcopy(s) for s in self.students[:n_teachers])
        for teacher in self.teachers:
            teacher.requires_grad_(False)
        self.use_isda = cfg.feature_aug == "isda"
        dim = feature_dim or self.students[0].classifier.in_channels
        n_stats = n_students + (n_teachers if cfg.isda_teachers else 0)
        self.feature_stats = nn.ModuleList(ClassFeatureStats(num_classes, dim) for _ in range(n_stats if self.use_isda else 0))
        self.selectors = nn.ModuleList(
            KnowledgeSelector(num_classes, cfg.tau_t, cfg.threshold_mode, cfg.adaptive_floor) for _ in range(max(n_teachers, 1))
        )
        self.aligner = DistributionAligner(num_classes, n_teachers) if cfg.distribution_alignment and n_teachers else None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self._student_calls: list[nn.Module] = list(self.students)
        self.branches = BranchRunner()  # one after the other until `branches.parallel(...)`

    # ------------------------------------------------------------------ plumbing

    @property
    def uses_unlabeled(self) -> bool:
        return self.cfg.uses_unlabeled

    def wrap_students(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run the students' forward through wrappers (e.g. DistributedDataParallel)."""
        self._student_calls = [wrap(s) for s in self.students]

    def train(self, mode: bool = True) -> "MutualKD":
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()  # no dropout in pseudo-labels
            if mode and self.cfg.bn_buffers == "none":  # no EMA'd statistics: normalise by the batch
                for m in teacher.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
        return self

    @torch.no_grad()
    def update_teachers(self) -> None:
        decay = ema_decay_at(int(self.iteration), self.cfg.ema_decay)
        for teacher, student in zip(self.teachers, self.students):
            ema_update(teacher, student, decay, self.cfg.bn_buffers)

    def unsup_weight(self) -> float:
        step = int(self.iteration) - self.cfg.warmup_iters
        return 0.0 if step < 0 else sigmoid_rampup(step, self.cfg.rampup_iters)

    def isda_strength(self) -> float:
        return cosine_rampup(int(self.iteration), self.total_iters, self.cfg.lam_max) if self.use_isda else 0.0

    # ------------------------------------------------------------------ the step

    def compute_losses(self, batch: Batch) -> StepOutput:
        cfg, ignore = self.cfg, self.ignore_index
        n_l = batch.x_l.shape[0]
        # During the warm-up nothing reads the unlabeled images: each student takes exactly the
        # step supervised training takes, at its cost (the teachers still follow by EMA).
        unlabeled = self.uses_unlabeled and cfg.reads_unlabeled(int(self.iteration) + 1)  # this step, 1-based
        if self.training and self.aligner is not None:
            self.aligner.observe_labels(batch.y_l)
        if unlabeled:
            x_mix = to_strong_view(batch, batch.x_s)
            valid_u = to_strong_view(batch, ~batch.ignore_u)
        lam = self.isda_strength()
        fp = cfg.fp_dropout if cfg.feature_aug == "dropout" else 0.0

        # Branch i: teacher i's pseudo-labels on the weak view (mixed with the same boxes), then
        # student i's forwards over labeled and mixed strong images. The branches may run side
        # by side (see branches.py). The teachers run under inference mode (no autograd
        # bookkeeping); their targets are cloned out of it, as the losses save them for backward.
        parts = [batch.x_l, x_mix] if unlabeled else [batch.x_l]

        def forward_branch(i: int):
            target = None
            if unlabeled and i < len(self.teachers):
                with torch.inference_mode():
                    conf, label = self._teacher_targets(i, batch, lam)
                target = (conf.clone(), label.clone())
            return target, self._forward(self._student_calls[i], parts, fp_dropout=fp)

        teacher_targets, outs = zip(*self.branches.map(forward_branch, range(len(self.students))))
        valid_all = torch.cat([batch.y_l != ignore, valid_u]) if unlabeled else batch.y_l != ignore
        # Pixels the distillation terms cover: the unlabeled part, or every image (reference).
        distill = slice(0, None) if cfg.distill_labeled else slice(n_l, None)
        valid_d = self._at_distill_scale(valid_all[distill])

        # Pseudo-labeller of each student and which pixels pass knowledge selection.
        st_targets, st_keep = [], []
        for i in range(len(self.teachers) if unlabeled else 0):
            t = 1 - i if self.crossed else i
            conf, label = teacher_targets[t]
            keep = self.selectors[t].select(conf, label, valid_d)
            st_targets.append(label)
            st_keep.append(keep)
        if cfg.name == "oracle" and unlabeled:
            truth = self._mixed_truth(batch)
            st_targets, st_keep = [truth], [valid_d & (truth != ignore)]

        # ISDA-augmented student logits, with gt on labeled pixels and the pseudo-label elsewhere.
        logits = []
        for i, out in enumerate(outs):
            z = out["logits"]
            if self.use_isda:
                isda_target = self._isda_target(i, batch.y_l, outs, st_targets, valid_all, n_l, unlabeled)
                self.feature_stats[i].update(out["features"], self._own_labels(batch.y_l, z, valid_all, n_l, unlabeled))
                offsets = self.feature_stats[i].logit_offsets(self.students[i].classifier.weight, lam,
                                                              cfg.isda_detach_weights)
                z = augment_logits(z, isda_target, offsets)
            logits.append(z)

        # One log-softmax per network, shared by its terms, and split once: the backward of a
        # split is one concatenation, where a slice per term would each fill a full-batch zero.
        log_probs = [z.float().log_softmax(dim=1) for z in logits]
        labeled_lp, unlabeled_lp = zip(*(lp.split([n_l, lp.shape[0] - n_l]) for lp in log_probs))
        distill_logits = [self._at_distill_scale(z[distill]) for z in logits]
        if self.coarse_distillation:
            distill_lp = [z.float().log_softmax(dim=1) for z in distill_logits]
        else:
            distill_lp = log_probs if cfg.distill_labeled else unlabeled_lp
        zero = batch.x_l.new_zeros(())
        loss_sup = [supervised_nll(lp, batch.y_l, ignore) for lp in labeled_lp]

        loss_st = [zero] * len(self.students)
        for i, (target, keep) in enumerate(zip(st_targets, st_keep)):
            loss_st[i] = masked_nll(distill_lp[i], target, keep, valid_d, cfg.loss_norm)
            if fp:
                fp_logits = self._at_distill_scale(outs[i]["logits_fp"][distill])
                fp_term = masked_cross_entropy(fp_logits, target, keep, valid_d, cfg.loss_norm)
                loss_st[i] = 0.5 * (loss_st[i] + fp_term)

        loss_ss, ss_ratio = [zero] * len(self.students), zero
        if unlabeled and len(self.students) == 2 and cfg.lambda_ss > 0:
            for i in range(2):
                conf, label = pseudo_labels(distill_logits[1 - i])
                keep = valid_d & (conf >= cfg.tau_s)
                loss_ss[i] = masked_nll(distill_lp[i], label, keep, valid_d, cfg.loss_norm)
                ss_ratio = ss_ratio + keep.sum() / valid_d.sum().clamp(min=1) / 2

        # Each student's loss reads the other branch only through detached targets, so the
        # per-student sums can be back-propagated apart (and side by side).
        ramp = self.unsup_weight()
        per_student = [sup + ramp * cfg.lambda_st * st + ramp * cfg.lambda_ss * ss
                       for sup, st, ss in zip(loss_sup, loss_st, loss_ss)]
        loss = sum(per_student, zero)
        loss_sup, loss_st, loss_ss = (sum(terms, zero) for terms in (loss_sup, loss_st, loss_ss))

        metrics = {
            "loss": loss.detach(),
            "loss_sup": loss_sup.detach(),
            "loss_st": loss_st.detach(),
            "loss_ss": loss_ss.detach(),
            "unsup_weight": torch.tensor(ramp),
            "isda_lambda": torch.tensor(lam),
        }
        metrics.update(self._pseudo_label_metrics(st_targets, st_keep, ss_ratio, batch, valid_d, n_l))
        return StepOutput(loss, metrics, per_student if self.branches.is_parallel else [loss])

    # ------------------------------------------------------------------ helpers

    def _forward(self, net: Callable[..., dict], parts: list[torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        """One network over the labeled and unlabeled images, outputs concatenated in that order:
        a forward per part (`split_forward`, the reference), so BatchNorm normalises labeled
        images by labeled statistics alone, as supervised training does; else one forward."""
        if not self.cfg.split_forward or len(parts) == 1:
            return net(torch.cat(parts), **kwargs)
        outs = [net(part, **kwargs) for part in parts]
        return {key: torch.cat([out[key] for out in outs]) for key in outs[0]}

    def _teacher_targets(self, t: int, batch: Batch, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher t's (confidence, label) on the distilled images, in the strong view's geometry
        (warped, CutMix-mixed) on the unlabeled part. Called under inference mode."""
        teacher = self.teachers[t]
        out = self._forward(teacher, [batch.x_l, batch.x_w] if self.cfg.distill_labeled else [batch.x_w])
        z = out["logits"]
        ignore = self._teacher_ignore(batch)
        n_l = batch.x_l.shape[0]
        if self.use_isda and self.cfg.isda_teachers:
            stats = self.feature_stats[len(self.students) + t]
            own = class_argmax(z)
            if self.cfg.distill_labeled:
                own = torch.cat([batch.y_l, own[n_l:]])
            own_valid = own.masked_fill(ignore, self.ignore_index)
            stats.update(out["features"], own_valid)
            plain, z = z, augment_logits(z, own_valid, stats.logit_offsets(teacher.classifier.weight, lam))
        valid = self._at_distill_scale(~ignore) if self.aligner is not None else None  # alignment's pixels
        conf, label = self._confident_class(t, z, valid)
        if self.use_isda and self.cfg.isda_teachers and self.cfg.select_before_isda:
            # The label after ISDA, its confidence before it (reference).
            conf = self._confident_class(t, plain, valid, update=False)[0]
        if self.cfg.distill_labeled:
            conf = torch.cat([conf[:n_l], to_strong_view(batch, conf[n_l:])])
            label = torch.cat([label[:n_l], to_strong_view(batch, label[n_l:])])
        else:
            conf, label = to_strong_view(batch, conf), to_strong_view(batch, label)
        return conf, label

    def _confident_class(self, t: int, logits: torch.Tensor, valid: Optional[torch.Tensor],
                         update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher t's (confidence, label) at the distillation scale, after distribution
        alignment when it is on (its statistics read the `valid` pixels)."""
        z = self._at_distill_scale(logits)
        if self.aligner is None:
            return pseudo_labels(z)
        probs = self.aligner.align(t, z.detach().float().softmax(dim=1), valid, update)
        return class_max(probs)

    @property
    def coarse_distillation(self) -> bool:
        return self.cfg.distill_scale < 1

    def _at_distill_scale(self, x: torch.Tensor) -> torch.Tensor:
        """A map at the distillation terms' resolution (`distill_scale`): logits bilinearly,
        labels and masks by nearest neighbour, as the reference resizes them."""
        if not self.coarse_distillation:
            return x
        size = [max(1, int(n * self.cfg.distill_scale)) for n in x.shape[-2:]]
        if x.is_floating_point() and x.dim() == 4:
            return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return nearest_resize(x, size)

    def _teacher_ignore(self, batch: Batch) -> torch.Tensor:
        """Padding of the weak view (and ignore pixels of the labeled part) for teacher inputs."""
        if self.cfg.distill_labeled:
            return torch.cat([batch.y_l == self.ignore_index, batch.ignore_u])
        return batch.ignore_u

    def _isda_target(self, i, y_l, outs, st_targets, valid_all, n_l, unlabeled) -> torch.Tensor:
        """The label each student pixel is augmented towards: gt, else its training target."""
        if not unlabeled:
            return y_l
        if self.cfg.isda_unlabeled_target == "pseudo_label" and st_targets:
            unl = st_targets[i] if not self.cfg.distill_labeled else st_targets[i][n_l:]
            # ISDA augments the full-resolution logits; coarse targets are brought back up.
            unl = nearest_resize(unl, valid_all.shape[-2:]) if self.coarse_distillation else unl
        else:  # the argmax of the network that provides the target: CPS's other student, else its own
            source = 1 - i if len(outs) == 2 and self.cfg.isda_unlabeled_target == "pseudo_label" else i
            unl = class_argmax(outs[source]["logits"][n_l:].detach())
        target = torch.cat([y_l, unl])
        return target.masked_fill(~valid_all, self.ignore_index)

    def _own_labels(self, y_l, logits, valid_all, n_l, unlabeled) -> torch.Tensor:
        """Labels for a student's feature statistics: gt on labeled pixels, its own argmax elsewhere."""
        if not unlabeled:
            return y_l
        own = torch.cat([y_l, class_argmax(logits[n_l:].detach())])
        return own.masked_fill(~valid_all, self.ignore_index)

    def _mixed_truth(self, batch: Batch) -> torch.Tensor:
        """Ground truth of the distilled pixels in the strong view's geometry (255 where unknown)."""
        y_u = to_strong_view(batch, self._at_distill_scale(batch.y_u))
        return torch.cat([self._at_distill_scale(batch.y_l), y_u]) if self.cfg.distill_labeled else y_u

    @torch.no_grad()
    def _pseudo_label_metrics(self, targets, keeps, ss_ratio, batch, valid_d, n_l) -> dict[str, torch.Tensor]:
        if not targets:
            return {"mask_ratio": ss_ratio}
        ratio = sum(k.sum() for k in keeps) / (valid_d.sum().clamp(min=1) * len(keeps))
        out = {"mask_ratio": ratio}
        if batch.y_u is not None:
            y_u = self._mixed_truth(batch)
            known = valid_d & (y_u != self.ignore_index)
            correct = sum(((t == y_u) & known).sum() for t in targets)
            correct_kept = sum(((t == y_u) & known & k).sum() for t, k in zip(targets, keeps))
            kept = sum((known & k).sum() for k in keeps)
            # NaN when the unlabeled images carry no ground truth.
            out["pseudo_acc"] = correct / (known.sum() * len(targets))
            out["pseudo_acc_kept"] = correct_kept / kept
        return out

    # ------------------------------------------------------------------ inference

    def predictor(self, which: str = "student") -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> class probabilities (B, C, H, W) from S1, T1 or the mean of S1 and S2."""
        if which == "teacher" and not self.teachers:
            raise ValueError(f"eval.model='teacher' needs a method with teachers, not {self.cfg.name!r}")
        nets = {"student": self.students[:1], "teacher": self.teachers[:1], "ensemble": self.students}[which]

        def predict(x: torch.Tensor) -> torch.Tensor:
            return sum(net(x)["logits"].float().softmax(1) for net in nets) / len(nets)

        return predict
