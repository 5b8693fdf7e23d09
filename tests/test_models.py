import dataclasses

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


def test_source_task_has_its_own_label_set_and_renders_deterministically():
    import numpy as np

    from mkd_ray.data.scenes import glyphs, source, textures

    assert not set(source.CATEGORIES) & (set(textures.CLASS_NAMES) | set(glyphs.CLASS_NAMES))
    images, labels = source.classification_set(per_category=2, size=32, seed=3)
    again, _ = source.classification_set(per_category=2, size=32, seed=3)
    assert images.shape == (2 * len(source.CATEGORIES), 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.bincount(labels).tolist() == [2] * len(source.CATEGORIES)
    assert len({image.tobytes() for image in images}) == len(images)


def test_pretrained_source_backbone_loads_into_every_branch(tmp_path):
    from mkd_ray.models.pretrain import SourceTask, cache_path, pretrain

    cfg = ModelConfig(backbone="resnet18", width=0.125, output_stride=8, aspp_channels=16, decoder_channels=16,
                      low_level_channels=8)
    task = SourceTask(per_category=2, heldout_per_category=1, iters=20, batch_size=8)
    out = cache_path(tmp_path, cfg, task)
    assert cache_path(tmp_path, ModelConfig(width=0.25, output_stride=8), task) != out  # another layout, another file
    report = pretrain(cfg, task, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), out, log=lambda _: None)
    assert out.is_file() and out.with_suffix(".json").is_file() and 0 <= report["heldout_accuracy"] <= 1
    weights = torch.load(out, weights_only=True)
    loaded = ModelConfig(**{**cfg.__dict__, "pretrained": str(out)})
    for seed in (0, 1):  # the two branches: different heads, the same backbone
        backbone = build_model(loaded, 5, seed=seed).backbone.state_dict()
        assert all(torch.equal(backbone[k], v) for k, v in weights.items()) and len(weights) == len(backbone)
    random_init = build_model(cfg, 5, seed=0).backbone.state_dict()
    assert not torch.equal(random_init["layer4.1.conv2.weight"], weights["layer4.1.conv2.weight"])


def test_pre_training_does_not_depend_on_the_callers_threads(tmp_path):
    """A CPU's kernels sum in an order set by the thread count; the task fixes it for the
    pre-training, so a driver on one thread and one on two cache the same backbone."""
    from mkd_ray.models.pretrain import SourceTask, cache_path, pretrain

    cfg = ModelConfig(backbone="resnet18", width=0.125, output_stride=8)
    task = SourceTask(per_category=4, heldout_per_category=1, iters=20, batch_size=32, threads=2)
    assert cache_path(tmp_path, cfg, task) != cache_path(tmp_path, cfg, dataclasses.replace(task, threads=1))
    before, weights = torch.get_num_threads(), []
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            pretrain(cfg, task, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tmp_path / f"{caller}.pt", log=lambda _: None)
            assert torch.get_num_threads() == caller  # the caller's threads again afterwards
            weights.append(torch.load(tmp_path / f"{caller}.pt", weights_only=True))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ValueError, match="SourceTask.iters: at least 20"):
        SourceTask(iters=10)


def test_a_harness_table_refuses_runs_from_other_initial_weights(tmp_path, monkeypatch):
    """On another kind of CPU pre-training yields other weights under the same cache name: a
    table's runs pin their weights' digest, and other weights cannot resume the table."""
    import json

    from tests.conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from _runs import pin_weights

    first, other, table = tmp_path / "first.pt", tmp_path / "other.pt", tmp_path / "table"
    torch.save({"w": torch.zeros(2)}, first)
    torch.save({"w": torch.ones(2)}, other)
    table.mkdir()
    pin_weights(table, str(first))
    pin_weights(table, str(first))  # the same weights resume the table
    pin_weights(table, None)  # random initialisation pins nothing
    with pytest.raises(SystemExit, match=r"other.pt .* is not the weights the runs in .* started from .*first.pt"):
        pin_weights(table, str(other))
    assert json.loads((table / "weights.json").read_text())["path"] == str(first)
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "weights.json").write_text(json.dumps({"path": None, "sha256": None, "note": "pre-trained elsewhere"}))
    with pytest.raises(SystemExit, match=r"weights that were not kept \(pre-trained elsewhere"):
        pin_weights(lost, str(first))


def test_source_names_one_cached_backbone_per_layout(tmp_path, monkeypatch):
    from mkd_ray.config import load_config, with_absolute_paths
    from mkd_ray.models import pretrain

    monkeypatch.setattr(pretrain, "CACHE", tmp_path / "cache")
    task = pretrain.SourceTask(per_category=2, heldout_per_category=1, iters=20, batch_size=8)
    tiny = ["model.width=0.125", "model.aspp_channels=16", "model.decoder_channels=16", "model.low_level_channels=8"]
    cfg = with_absolute_paths(load_config(None, [*tiny, "model.pretrained=source"]))
    assert cfg.model.pretrained == "source"  # a name, not a path, until a driver resolves it
    with pytest.raises(ValueError, match="'source' names a file"):
        build_model(cfg.model, 5)
    logged = []
    resolved = pretrain.with_source_backbone(cfg, logged.append, task)
    path = resolved.model.pretrained
    assert path == str(pretrain.cache_path(tmp_path / "cache", cfg.model, task).resolve()) and logged
    assert pretrain.with_source_backbone(cfg, logged.append, task) == resolved and len(logged) == len(set(logged))
    weights = torch.load(path, weights_only=True)
    assert torch.equal(build_model(resolved.model, 5, seed=1).backbone.layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])
    unchanged = load_config(None, tiny)
    assert pretrain.with_source_backbone(unchanged, logged.append, task) is unchanged


def test_a_sweep_with_the_source_backbone_cannot_search_its_layout(tmp_path):
    from mkd_ray.config import ConfigError
    from mkd_ray.tune.space import load_sweep
    from tests.conftest import REPO

    space = tmp_path / "space.yaml"
    space.write_text(f"base: {REPO / 'pipelines' / 'synthetic.yaml'}\nset: {{model.pretrained: source}}\n"
                     "space:\n  model.width: {choice: [0.25, 0.5]}\n")
    with pytest.raises(ConfigError, match="space.model.width: the sweep loads one source-task backbone"):
        load_sweep(space)
    space.write_text(space.read_text().replace("model.width", "method.ema_decay").replace("[0.25, 0.5]", "[0.99, 0.999]"))
    assert load_sweep(space).base.model.pretrained == "source"


def test_pretrain_command_writes_weights_that_train_reads(tmp_path, capsys):
    from mkd_ray.cli import main

    out = tmp_path / "backbone.pt"
    assert main(["pretrain", "--iters", "10", "--per-category", "1", "--out", str(out)]) == 2
    assert "--iters: must be at least 20, got 10" in capsys.readouterr().err and not out.exists()
    assert main(["pretrain", "--iters", "20", "--per-category", "1", "--out", str(out), "--set", "model.width=0.125"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"--set model.pretrained={out}" in printed
    assert torch.load(out, weights_only=True)["stem.0.weight"].shape[0] == 8  # 64 * 0.125 stem channels
