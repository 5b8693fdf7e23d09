import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mkd_ray.config import AugmentConfig, CutMixConfig, StrongAffineConfig, SynthConfig, load_config
from mkd_ray.data import io, scenes, splits, synthetic
from mkd_ray.data.augment import (
    IDENTITY_WARP,
    REFERENCE_OP_WEIGHTS,
    cutmix_box_mask,
    labeled_views,
    reference_op,
    sample_rng,
    strong_affine_theta,
    strong_photometric,
    unlabeled_views,
)
from mkd_ray.data.sources import resolve_data


def make_voc(root: Path, names: list[str], seed: int = 0) -> Path:
    """A tiny VOC2012 tree in torchvision's layout: root/VOCdevkit/VOC2012."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        h, w = rng.integers(20, 40, size=2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        mask = rng.integers(0, 21, (h, w)).astype(np.uint8)
        mask[0] = 255
        io.save_mask(mask, voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:-2]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(names[-2:]) + "\n")
    return voc


def test_voc_reader_agrees_with_torchvision(tmp_path):
    from torchvision.datasets import VOCSegmentation

    names = [f"2007_{i:06d}" for i in range(6)]
    voc = make_voc(tmp_path, names)
    for image_set in ("train", "val"):
        ours = io.voc_samples(voc, image_set)
        theirs = VOCSegmentation(str(tmp_path), year="2012", image_set=image_set, download=False)
        assert len(ours) == len(theirs)
        for ref, (image, target) in zip(ours, theirs):
            assert ref.image == Path(theirs.images[ours.index(ref)])
            assert np.array_equal(io.load_image(ref.image), np.array(image))
            assert np.array_equal(io.load_mask(ref.mask, 21), np.array(target))


def test_masks_round_trip_with_ignore_pixels(tmp_path):
    mask = np.array([[0, 1, 2, 3], [4, 255, 0, 1]], dtype=np.uint8)
    io.save_mask(mask, tmp_path / "m.png")
    assert np.array_equal(io.load_mask(tmp_path / "m.png"), mask)


def test_invalid_class_id_names_the_file(tmp_path):
    io.save_mask(np.array([[0, 7]], dtype=np.uint8), tmp_path / "bad.png")
    with pytest.raises(io.DatasetError, match=r"bad.png.*\[7\].*0\.\.4"):
        io.load_mask(tmp_path / "bad.png", num_classes=5)


def test_split_file_errors_name_file_and_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    listing = tmp_path / "labeled.txt"
    listing.write_text("a.jpg a.png\n")
    with pytest.raises(io.DatasetError, match=r"labeled.txt:1: .*a.png does not exist"):
        io.read_split_file(listing, tmp_path)
    listing.write_text("a.jpg\n")
    with pytest.raises(io.DatasetError, match=r"labeled.txt:1: expected '<image> <mask>'"):
        io.read_split_file(listing, tmp_path)
    assert io.read_split_file(listing, tmp_path, need_masks=False)[0].mask is None
    with pytest.raises(io.DatasetError, match="dataset root"):
        io.read_split_file(listing, tmp_path / "nope")


def test_cityscapes_reader(tmp_path):
    for split in ("train", "val"):
        for city, stem in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
            (tmp_path / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (tmp_path / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 4)).save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            io.save_mask(np.zeros((4, 8), np.uint8), tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
    refs = io.cityscapes_samples(tmp_path, "train")
    assert [r.image.parent.name for r in refs] == ["aachen", "bremen"]
    assert refs[0].mask.name == "aachen_000000_000019_gtFine_labelTrainIds.png"
    (refs[1].mask).unlink()
    with pytest.raises(io.DatasetError, match="bremen_000001_000019_gtFine_labelTrainIds.png does not exist"):
        io.cityscapes_samples(tmp_path, "train")


def test_seeded_splits_are_nested_and_reproducible():
    refs = [io.SampleRef(Path(f"{i}.jpg"), Path(f"{i}.png")) for i in range(64)]
    a = splits.make_splits(refs, ["1_16", "1_4", "10"], seed=3)
    b = splits.make_splits(refs, ["1_16", "1_4", "10"], seed=3)
    assert a == b
    assert len(a["1_16"][0]) == 4 and len(a["1_4"][0]) == 16 and len(a["10"][0]) == 10
    assert set(a["1_16"][0]) <= set(a["1_4"][0])
    assert set(a["1_16"][0]).isdisjoint(a["1_16"][1]) and len(a["1_16"][1]) == 60
    assert splits.make_splits(refs, ["1_16"], seed=4)["1_16"][0] != a["1_16"][0]
    with pytest.raises(io.DatasetError, match="1_x"):
        splits.labeled_count("1_x", 64)


def test_synthetic_dataset_is_deterministic_and_in_voc_layout(tmp_path):
    cfg = SynthConfig(num_train=32, num_val=8, splits=["1_8"])
    synthetic.generate(tmp_path / "a", cfg)
    synthetic.generate(tmp_path / "b", cfg)
    names = (tmp_path / "a/ImageSets/Segmentation/train.txt").read_text().split()
    assert len(names) == 32
    for name in names[:4]:
        ma = io.load_mask(tmp_path / "a/SegmentationClass" / f"{name}.png", 5)
        mb = io.load_mask(tmp_path / "b/SegmentationClass" / f"{name}.png", 5)
        assert np.array_equal(ma, mb)
        assert Image.open(tmp_path / "a/SegmentationClass" / f"{name}.png").mode == "P"
    all_masks = np.stack([io.load_mask(p) for p in (tmp_path / "a/SegmentationClass").glob("*.png")])
    assert set(np.unique(all_masks)) <= {0, 1, 2, 3, 4, 255}
    assert {1, 2, 3, 4} <= set(np.unique(all_masks))  # every class appears
    assert 0.0 < (all_masks == 255).mean() < 0.15
    assert (tmp_path / "a/splits/1_8/labeled.txt").read_text().count("\n") == 4
    assert synthetic.is_generated(tmp_path / "a", cfg)
    other = scenes.render(cfg.kind, np.random.default_rng([1, 0]), 32)[1]
    assert not np.array_equal(other, io.load_mask(tmp_path / "a/SegmentationClass/train_000000.png"))


# docs/synthetic.md states these shares of pixels (32 px scenes): background, each foreground class.
CLASS_BALANCE = {"textures": ((0.62, 0.76), (0.045, 0.09)), "glyphs": ((0.62, 0.76), (0.045, 0.09)),
                 "shapes": ((0.76, 0.88), (0.015, 0.07))}


@pytest.mark.parametrize("kind", ["textures", "glyphs", "shapes"])
def test_synthetic_masks_have_the_documented_classes_band_and_balance(kind):
    masks = np.stack([scenes.render(kind, np.random.default_rng([7, i]), 32)[1] for i in range(256)])
    (bg_lo, bg_hi), (fg_lo, fg_hi) = CLASS_BALANCE[kind]
    shares = {c: (masks == c).mean() for c in range(5)}
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4, 255}
    assert 0.02 < (masks == 255).mean() < 0.08  # the boundary band of mixed 2x2 blocks
    assert bg_lo < shares[0] < bg_hi
    assert all(fg_lo < shares[c] < fg_hi for c in range(1, 5)), shares
    # A band, not regions: no ignore pixel has a whole 3x3 neighbourhood of ignore.
    windows = np.lib.stride_tricks.sliding_window_view(masks == 255, (3, 3), axis=(1, 2))
    assert not windows.all(axis=(-2, -1)).any()


@pytest.mark.parametrize("kind", list(scenes.KINDS))
def test_every_kind_renders_the_same_scene_from_the_same_seed(kind):
    first, again = (scenes.render(kind, np.random.default_rng([3, 5]), 32) for _ in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    other = scenes.render(kind, np.random.default_rng([3, 6]), 32)
    assert not np.array_equal(first[0], other[0])


def test_glyph_classes_differ_in_the_shape_of_a_mark_not_in_its_ink():
    from mkd_ray.data.scenes.glyphs import _shape

    u, v = np.meshgrid(np.linspace(-0.5, 0.5, 201), np.linspace(-0.5, 0.5, 201))
    marks = [_shape(c, u, v) for c in range(1, 5)]
    assert all(0.43 <= m.mean() <= 0.48 for m in marks)  # docs/synthetic.md: 44-47% of the square
    for a in range(4):
        for b in range(a + 1, 4):
            assert (marks[a] != marks[b]).mean() > 0.2, (a + 1, b + 1)


def test_resolve_data_reports_missing_pieces(tmp_path, synthetic_root, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    data = resolve_data(cfg)
    assert len(data.labeled) == 16 and len(data.unlabeled) == 112 and len(data.val) == 32
    with pytest.raises(io.DatasetError, match="data.root"):
        resolve_data(load_config(None, tiny_overrides + [f"data.root={tmp_path / 'missing'}"]))
    with pytest.raises(io.DatasetError, match="data.split '1_3'"):
        resolve_data(load_config(None, tiny_overrides + ["data.split=1_3"]))


def test_oracle_needs_masks_for_every_unlabeled_image(tmp_path, synthetic_root, tiny_overrides):
    split = tmp_path / "split"
    split.mkdir()
    (split / "labeled.txt").write_text((synthetic_root / "splits/1_8/labeled.txt").read_text())
    lines = (synthetic_root / "splits/1_8/unlabeled.txt").read_text().splitlines()
    (split / "unlabeled.txt").write_text("\n".join([lines[0].split()[0], *lines[1:]]) + "\n")
    overrides = tiny_overrides + [f"data.split={split}", f"data.splits_dir={synthetic_root / 'splits'}"]
    assert len(resolve_data(load_config(None, overrides)).unlabeled) == len(lines)  # other methods: fine
    with pytest.raises(io.DatasetError, match=r"method 'oracle'.*1 lines of .*unlabeled.txt name none"):
        resolve_data(load_config(None, overrides + ["method.name=oracle"]))


# ----------------------------------------------------------------------------- Parquet packs


def test_a_pack_serves_the_same_samples_as_its_folder(tiny_overrides, packed_uri):
    from mkd_ray.data.torch_data import EvalSet, TrainSet

    folder_cfg = load_config(None, tiny_overrides)
    packed_cfg = load_config(None, tiny_overrides + ["data.format=parquet", f"data.root={packed_uri}"])
    folder, pack = resolve_data(folder_cfg), resolve_data(packed_cfg)
    for role in ("labeled", "unlabeled", "val"):
        assert [r.name for r in getattr(folder, role)] == [r.name for r in getattr(pack, role)]
    assert all(r.packed is not None for r in pack.unlabeled)
    for labeled, refs_f, refs_p in ((True, folder.labeled, pack.labeled), (False, folder.unlabeled, pack.unlabeled)):
        for key in [(0, 0), (3, len(refs_f) - 1)]:
            a, b = TrainSet(refs_f, folder_cfg, labeled)[key], TrainSet(refs_p, packed_cfg, labeled)[key]
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    a, b = EvalSet(folder.val, folder_cfg)[5], EvalSet(pack.val, packed_cfg)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["name"] == b["name"]


def test_pack_cli_refuses_to_overwrite_and_bad_packs_are_named(tmp_path, synthetic_root, tiny_overrides):
    from mkd_ray import cli
    from mkd_ray.data import packed

    out = tmp_path / "pack"
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    assert cli.main(["data", "pack", *sets, "--out", str(out), "--rows-per-file", "50"]) == 0
    manifest = (out / "pack.json").read_text()
    assert len(list(out.glob("part-*.parquet"))) == 4  # 160 samples, 50 a file
    assert cli.main(["data", "pack", *sets, "--out", str(out)]) == 2  # not empty: refused
    assert (out / "pack.json").read_text() == manifest

    def packed_cfg(root, *extra):
        return load_config(None, tiny_overrides + ["data.format=parquet", f"data.root={root}", *extra])

    with pytest.raises(io.DatasetError, match="pack.json is missing"):
        resolve_data(packed_cfg(synthetic_root))  # a folder dataset is not a pack
    (out / "splits/1_8/labeled.txt").write_text("JPEGImages/nowhere.jpg SegmentationClass/nowhere.png\n")
    packed.pack_index.cache_clear()
    with pytest.raises(io.DatasetError, match=r"labeled.txt:1: JPEGImages/nowhere.jpg is not in the pack"):
        resolve_data(packed_cfg(out))


# ----------------------------------------------------------------------------- augmentation


def test_weak_view_pads_with_ignore_and_is_reproducible():
    image = np.full((10, 10, 3), 200, np.uint8)
    mask = np.ones((10, 10), np.uint8)
    cfg = AugmentConfig(scale_range=(0.5, 0.5))
    a = labeled_views(image, mask, 16, cfg, sample_rng(0, 0, 1))
    b = labeled_views(image, mask, 16, cfg, sample_rng(0, 0, 1))
    assert a["image"].shape == (3, 16, 16) and a["mask"].shape == (16, 16)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    # 10 px scaled by 0.5 -> 5 px of content, the rest is padding: image 0, mask 255
    assert (a["mask"] == 1).sum() == 25 and (a["mask"] == 255).sum() == 16 * 16 - 25
    assert (a["image"][:, a["mask"] == 255] == 0).all()


def test_unlabeled_views_share_geometry_and_mark_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    gt = rng.integers(0, 3, (24, 24)).astype(np.uint8)
    cfg = AugmentConfig(scale_range=(0.5, 0.8), strong="none")
    views = unlabeled_views(image, gt, 32, cfg, sample_rng(1, 2, 3))
    assert np.array_equal(views["weak"], views["strong"])  # no photometric change -> same pixels
    assert views["ignore"].any() and not views["ignore"].all()
    assert (views["mask"][views["ignore"]] == 255).all()
    assert views["cutmix"].dtype == bool and views["cutmix"].shape == (32, 32)
    no_gt = unlabeled_views(image, None, 32, cfg, sample_rng(1, 2, 3))
    assert (no_gt["mask"] == 255).all() and np.array_equal(no_gt["ignore"], views["ignore"])


@pytest.mark.parametrize("kind", ["reference", "unimatch", "mild", "none"])
def test_strong_views_keep_shape_and_dtype(kind):
    image = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    for seed in range(10):
        out = strong_photometric(image, kind, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == torch.uint8


def test_the_reference_set_draws_its_ops_with_the_references_weights():
    # albumentations 1.x SomeOf(n=1) over p = (0.3, 0.5, 0.1, 0.1, 0.5): blur and grayscale a
    # third of the views each, not one in five as a uniform draw would give.
    rng = np.random.default_rng(0)
    counts = np.bincount([reference_op(rng) for _ in range(20000)], minlength=5) / 20000
    assert np.allclose(counts, [0.2, 1 / 3, 1 / 15, 1 / 15, 1 / 3], atol=0.012)
    assert np.isclose(REFERENCE_OP_WEIGHTS.sum(), 1.0)


def test_blur_sigma_sets_how_much_the_strong_blur_softens():
    checks = torch.from_numpy(np.indices((16, 16)).sum(0) % 2 * 255).to(torch.uint8).expand(3, 16, 16)
    seed = next(s for s in range(100) if reference_op(np.random.default_rng(s)) == 1)  # a blurred view
    sharp = strong_photometric(checks, "reference", np.random.default_rng(seed), blur_sigma=(0.01, 0.01))
    soft = strong_photometric(checks, "reference", np.random.default_rng(seed), blur_sigma=(3.0, 3.0))
    assert torch.equal(sharp, checks)
    assert soft.float().std() < 0.2 * checks.float().std()


def test_strong_affine_draws_stay_within_the_configured_ranges():
    assert np.array_equal(strong_affine_theta(StrongAffineConfig(), np.random.default_rng(0)), IDENTITY_WARP)
    cfg = StrongAffineConfig(prob=1.0, degrees=30, scale=(0.8, 1.25), translate=0.1)
    for seed in range(20):
        theta = strong_affine_theta(cfg, np.random.default_rng(seed))
        linear, offset = theta[:, :2].astype(np.float64), theta[:, 2]
        scale = 1 / math.sqrt(np.linalg.det(linear))  # the inverse map shrinks by 1 / scale
        angle = math.degrees(math.atan2(linear[0, 1], linear[0, 0]))
        shift = -np.linalg.solve(linear, offset) / 2  # back to fractions of the crop
        assert 0.8 - 1e-5 <= scale <= 1.25 + 1e-5 and abs(angle) <= 30 + 1e-4
        assert np.abs(shift).max() <= 0.1 + 1e-5


def test_cutmix_boxes_cover_the_requested_area():
    one_box = CutMixConfig(prob=1.0, num_boxes=1, area=(0.25, 0.25))
    areas = [cutmix_box_mask(64, 64, one_box, np.random.default_rng(s)).mean() for s in range(20)]
    assert np.allclose(areas, 0.25, atol=0.03)
    never = CutMixConfig(prob=0.0)
    assert not cutmix_box_mask(8, 8, never, np.random.default_rng(0)).any()
    three = CutMixConfig(prob=1.0, num_boxes=3, area=(0.25, 0.5))
    covered = [cutmix_box_mask(64, 64, three, np.random.default_rng(s)).mean() for s in range(20)]
    assert all(0.05 < c <= 0.5 + 0.03 for c in covered)


# ----------------------------------------------------------------------------- corrupt files


def corrupt_copy(synthetic_root: Path, tmp_path: Path, split_file: str, count: int) -> tuple[Path, list[Path]]:
    """A copy of the synthetic dataset whose first `count` images listed in `split_file` are truncated."""
    import shutil

    root = tmp_path / "corrupt"
    shutil.copytree(synthetic_root, root)
    broken = [root / line.split()[0] for line in (root / split_file).read_text().splitlines()[:count]]
    for image in broken:
        image.write_bytes(image.read_bytes()[:40])  # a real JPEG header, cut off
    return root, broken


def test_unreadable_unlabeled_image_is_replaced_counted_and_named(synthetic_root, tiny_overrides, tmp_path, caplog):
    from mkd_ray.data.torch_data import TrainSet

    root, broken = corrupt_copy(synthetic_root, tmp_path, "splits/1_8/unlabeled.txt", 2)
    cfg = load_config(None, tiny_overrides + [f"data.root={root}"])
    dataset = TrainSet(resolve_data(cfg).unlabeled, cfg, labeled=False)
    with caplog.at_level("WARNING"):
        sample = dataset[(0, 0)]  # images 0 and 1 are broken: image 2 stands in
    assert sample["skipped"] == 2
    assert np.array_equal(sample["weak"], dataset._views(0, 2)["weak"])
    assert all(str(image) in caplog.text for image in broken)
    assert dataset[(0, 5)]["skipped"] == 0


def test_unreadable_labeled_or_val_sample_is_an_error_naming_it_or_skipped(synthetic_root, tiny_overrides, tmp_path):
    from mkd_ray.data.sources import checked_data

    root, (broken,) = corrupt_copy(synthetic_root, tmp_path, "splits/val.txt", 1)
    cfg = load_config(None, tiny_overrides + [f"data.root={root}"])
    with pytest.raises(io.DatasetError, match=rf"cannot read image {broken}.*data.bad_samples=skip"):
        checked_data(cfg)
    warnings = []
    data = checked_data(load_config(None, tiny_overrides + [f"data.root={root}", "data.bad_samples=skip"]), warnings.append)
    assert len(data.val) == 31 and broken not in [ref.image for ref in data.val]
    warnings = [line for line in warnings if not line.startswith("data:")]  # the summary of what was read
    assert len(warnings) == 1 and str(broken) in warnings[0]
