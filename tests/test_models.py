import pytest
import torch

from mkd_ray.config import ModelConfig
from mkd_ray.models import build_model
from mkd_ray.models.deeplab import load_backbone_weights


@pytest.mark.parametrize(
    "backbone,width,os_",
    [("resnet18", 0.25, 8), ("resnet18", 1.0, 16), ("resnet34", 0.25, 32), ("resnet50", 1.0, 8),
     ("mobilenet_v3_small", 0.5, 16), ("mobilenet_v3_large", 0.5, 32)],
)
def test_deeplab_shapes_and_output_stride(backbone, width, os_):
    cfg = ModelConfig(backbone=backbone, width=width, output_stride=os_, aspp_channels=16, decoder_channels=16,
                      low_level_channels=8)
    model = build_model(cfg, num_classes=5, seed=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        low, high = model.backbone(x)
    assert out["logits"].shape == (2, 5, 64, 64)
    assert out["features"].shape == (2, 16, 16, 16)  # decoder features at stride 4
    assert model.classifier.in_channels == out["features"].shape[1]
    assert high.shape[-1] == 64 // os_


def test_feature_dropout_stream_in_the_same_forward():
    cfg = ModelConfig(width=0.25, output_stride=8, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    out = build_model(cfg, 3, seed=0).train()(torch.randn(2, 3, 32, 32), fp_dropout=0.5)
    assert out["logits_fp"].shape == out["logits"].shape


def test_branch_seeds_give_distinct_reproducible_initialisations():
    cfg = ModelConfig(width=0.25, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    a, a2, b = build_model(cfg, 3, seed=0), build_model(cfg, 3, seed=0), build_model(cfg, 3, seed=1)
    assert torch.equal(a.classifier.weight, a2.classifier.weight)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)


def test_backbone_weights_from_a_torchvision_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    cfg = ModelConfig(backbone="resnet18", pretrained=str(path), aspp_channels=16, decoder_channels=16, low_level_channels=8)
    model = build_model(cfg, 3, seed=0)
    assert torch.equal(model.backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_bad_weights_file_is_refused(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"something": torch.zeros(3)}, path)
    cfg = ModelConfig(backbone="resnet18", width=0.25, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    model = build_model(cfg, 3)
    with pytest.raises(ValueError, match="no tensor"):
        load_backbone_weights(model.backbone, str(path))
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_backbone_weights(model.backbone, str(tmp_path / "missing.pth"))
