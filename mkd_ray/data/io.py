"""Reading images, masks and UniMatch-style split files, with errors that name the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it."""


@dataclass(frozen=True)
class SampleRef:
    image: Path
    mask: Optional[Path]

    @property
    def name(self) -> str:
        return self.image.stem


def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map (index 255, the boundary, is cream)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def save_mask(mask: np.ndarray, path: Path) -> None:
    """Palette PNG with a full 256-entry palette (a shorter one silently changes values)."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(_PALETTE)
    image.save(path)


def load_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def load_mask(path: Path, num_classes: Optional[int] = None, ignore_index: int = 255) -> np.ndarray:
    """HxW uint8 class ids (palette indices for palette PNGs), checked against num_classes."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(f"mask {path} has mode {im.mode!r}; expected a palette or grayscale PNG of class ids")
            mask = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read mask {path}: {exc}") from None
    if num_classes is not None:
        check_mask_ids(mask, num_classes, ignore_index, path)
    return mask.astype(np.uint8)


def check_mask_ids(mask: np.ndarray, num_classes: int, ignore_index: int, path) -> None:
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        ids = sorted(int(v) for v in np.unique(mask[bad]))[:10]
        raise DatasetError(
            f"mask {path} has class ids {ids}; valid ids are 0..{num_classes - 1} and {ignore_index} (ignore)"
        )


def read_split_file(path: Path, root: Path, need_masks: bool = True) -> list[SampleRef]:
    """One sample a line: "<image> [<mask>]", both relative to `root`; every file must exist."""
    path, root = Path(path), Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist (set data.root)")
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    refs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (need_masks and len(parts) < 2):
            want = "'<image> <mask>'" if need_masks else "'<image> [<mask>]'"
            raise DatasetError(f"{path}:{lineno}: expected {want}, got {line!r}")
        image = root / parts[0]
        mask = root / parts[1] if len(parts) == 2 else None
        for file in (image, mask):
            if file is not None and not file.is_file():
                raise DatasetError(f"{path}:{lineno}: {file} does not exist")
        refs.append(SampleRef(image, mask))
    if not refs:
        raise DatasetError(f"split file {path} lists no samples")
    return refs


def write_split_file(path: Path, refs: list[SampleRef], root: Path, with_masks: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for ref in refs:
        line = str(ref.image.relative_to(root))
        if with_masks and ref.mask is not None:
            line += " " + str(ref.mask.relative_to(root))
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def voc_samples(root: Path, image_set: str = "train", aug_masks: bool = False) -> list[SampleRef]:
    """PASCAL VOC 2012 layout: ImageSets/Segmentation/<set>.txt, JPEGImages, SegmentationClass[Aug]."""
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not listing.is_file():
        raise DatasetError(f"VOC image set {listing} does not exist (is data.root the VOC2012 folder?)")
    mask_dir = root / ("SegmentationClassAug" if aug_masks else "SegmentationClass")
    refs = []
    for name in listing.read_text().split():
        ref = SampleRef(root / "JPEGImages" / f"{name}.jpg", mask_dir / f"{name}.png")
        for file in (ref.image, ref.mask):
            if not file.is_file():
                raise DatasetError(f"{listing}: {file} does not exist")
        refs.append(ref)
    return refs


def cityscapes_samples(root: Path, split: str = "train") -> list[SampleRef]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise DatasetError(f"Cityscapes folder {image_dir} does not exist (is data.root the Cityscapes root?)")
    refs = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        stem = image.name.removesuffix("_leftImg8bit.png")
        mask = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not mask.is_file():
            raise DatasetError(f"{mask} does not exist (run cityscapesscripts' createTrainIdLabelImgs first)")
        refs.append(SampleRef(image, mask))
    if not refs:
        raise DatasetError(f"no *_leftImg8bit.png images under {image_dir}")
    return refs
