import math

import pytest
import torch

from mkd_ray.evaluate import evaluate, sliding_window
from mkd_ray.metrics import MeanIoU, confusion_matrix, iou_per_class


def test_confusion_matrix_and_miou_against_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = confusion_matrix(pred, target, num_classes=4)
    # rows = truth, cols = prediction; the 255 pixel is skipped; class 3 never appears
    expected = torch.tensor([[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    iou = iou_per_class(cm)
    # class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 3 / (3 + 4 - 3) = 3/4; class 2: 1 / (2 + 1 - 1) = 1/2; class 3: nan
    assert iou[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(iou[3].item())
    meter = MeanIoU(4)
    meter.update(pred, target)
    assert meter.miou() == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_merging_matrices_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    pred = torch.randint(0, 3, (4, 8, 8), generator=g)
    whole, a, b = MeanIoU(3), MeanIoU(3), MeanIoU(3)
    whole.update(pred, target)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    assert torch.equal(a.merge(b).matrix, whole.matrix)


def test_sliding_window_equals_whole_for_a_pointwise_model():
    images = torch.randn(2, 3, 10, 13)

    def predict(x):  # pixel-wise: windows must reassemble exactly
        return torch.stack([x[:, 0], x[:, 1]], 1).softmax(1)

    out = sliding_window(predict, images, crop=4, stride_ratio=2 / 3, num_classes=2)
    assert torch.allclose(out, predict(images), atol=1e-6)


def test_evaluate_center_mode_crops_masks_too():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[:, :2] = 1  # only outside the centre crop

    def predict(x):
        return torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)

    batches = [{"image": images, "mask": masks}]
    center = evaluate(predict, batches, 2, (0, 0, 0), (1, 1, 1), mode="center", crop=4)
    whole = evaluate(predict, batches, 2, (0, 0, 0), (1, 1, 1), mode="whole")
    assert center.miou() == 100.0
    assert whole.miou() < 100.0
