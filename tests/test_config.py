import pytest

from mkd_ray.config import ConfigError, load_config, parse_override
from tests.conftest import REPO

PIPELINES = ["synthetic", "voc", "cityscapes"]


@pytest.mark.parametrize("name", PIPELINES)
def test_pipelines_load(name):
    cfg = load_config(REPO / "pipelines" / f"{name}.yaml")
    assert cfg.data.num_classes >= 2
    assert cfg.flat()["method.ema_decay"] == cfg.method.ema_decay


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["method.ema_decay=0.999", "model.aspp_rates=[1,2,3]", "data.class_names=null",
                             "train.iters=7", "scaling.use_gpu=false", "augment.cutmix.area=[0.1, 0.2]"])
    assert cfg.method.ema_decay == 0.999
    assert cfg.model.aspp_rates == (1, 2, 3)
    assert cfg.train.iters == 7 and cfg.augment.cutmix.area == (0.1, 0.2)


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.iters"):
        load_config(None, ["train.iters=true"])


BAD = [
    ("method.ema_decy=0.9", "method.ema_decy", "did you mean 'ema_decay'"),
    ("method.ema_decay=1.0", "method.ema_decay", r"\[0, 1\)"),
    ("method.ema_decay=-0.1", "method.ema_decay", r"\[0, 1\)"),
    ("method.tau_t=1.5", "method.tau_t", r"\[0, 1\]"),
    ("method.tau_s=-0.01", "method.tau_s", r"\[0, 1\]"),
    ("method.lambda_st=-1", "method.lambda_st", "inf"),
    ("method.lambda_ss=abc", "method.lambda_ss", "expected a number"),
    ("method.name=fixmatch", "method.name", "one of 'mkd'"),
    ("method.feature_aug=mixup", "method.feature_aug", "'isda'"),
    ("method.bn_buffers=avg", "method.bn_buffers", "'ema'"),
    ("method.threshold_mode=adaptive", "method.threshold_mode", "class_adaptive"),
    ("method.lam_max=-0.5", "method.lam_max", "inf"),
    ("data.crop_size=0", "data.crop_size", r"\[8, inf\]"),
    ("data.labeled_batch_size=0", "data.labeled_batch_size", "inf"),
    ("data.num_classes=1", "data.num_classes", r"\[2"),
    ("data.dataset=coco", "data.dataset", "'voc'"),
    ("data.format=zip", "data.format", "'parquet'"),
    ("data.class_names=[a,b]", "data.class_names", "data.num_classes"),
    ("data.ignore_index=3", "data.ignore_index", "collides"),
    ("model.backbone=vgg16", "model.backbone", "'resnet50'"),
    ("model.output_stride=4", "model.output_stride", "one of 8, 16, 32"),
    ("model.aspp_rates=[6,12]", "model.aspp_rates", "3"),
    ("model.width=0.5", None, None),  # valid on resnet18
    ("model.pretrained=none", "model.pretrained", "'none' does not exist.*'imagenet', 'source'.*or null"),
    ("model.pretrained=null", None, None),  # random initialisation
    ("train.iters=0", "train.iters", r"\[1, inf\]"),
    ("train.lr=0", "train.lr", r"\(0, inf\]"),
    ("train.optimizer=rmsprop", "train.optimizer", "'sgd'"),
    ("train.amp=fp16", "train.amp", "GPU"),
    ("augment.scale_range=[2.0,0.5]", "augment.scale_range", "min <= max"),
    ("augment.cutmix.area=[0.2,1.5]", "augment.cutmix.area", "max <= 1"),
    ("augment.cutmix.prob=2", "augment.cutmix.prob", r"\[0, 1\]"),
    ("augment.strong=heavy", "augment.strong", "'reference'"),
    ("augment.blur_sigma=[0,1]", "augment.blur_sigma", "0.01 <= min"),
    ("augment.strong_affine.scale=[1.5,0.5]", "augment.strong_affine.scale", "min <= max"),
    ("augment.strong_affine.degrees=270", "augment.strong_affine.degrees", r"\[0, 180\]"),
    ("eval.mode=tiles", "eval.mode", "'sliding'"),
    ("scaling.num_workers=-1", "scaling.num_workers", "inf"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker", r"\(0"),
    ("scaling.use_gpu=yes please", "scaling.use_gpu", "true or false"),
    ("train=5", "train", "mapping"),
    ("optimizer.lr=0.1", "optimizer", "valid keys"),
]


@pytest.mark.parametrize("override,field,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(override, field, message):
    if field is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.path.startswith(field)
    assert field in str(info.value)
    assert __import__("re").search(message, str(info.value)), str(info.value)


def test_combined_check_width_on_resnet50():
    with pytest.raises(ConfigError, match="model.width"):
        load_config(None, ["model.backbone=resnet50", "model.width=0.5"])


def test_pretrained_is_checked_when_the_config_is_validated(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.pretrained: ImageNet weights exist only for model.width=1.0"):
        load_config(None, ["model.pretrained=imagenet", "model.width=0.5"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"")
    assert load_config(None, ["model.pretrained=weights.pt"]).model.pretrained == "weights.pt"


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("method.ema_decay")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
