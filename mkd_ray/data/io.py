"""Reading images, masks and UniMatch-style split files, with errors that name the file."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it."""


@dataclass(frozen=True)
class PackedRow:
    """Where a sample lives in a Parquet pack: a file (path or URI) and its row there."""

    file: str
    row_group: int
    row: int


@dataclass(frozen=True)
class SampleRef:
    """One sample: files in a folder, or (when `packed` is set) a row of a Parquet pack,
    with `image` and `mask` as the relative paths the split files name."""

    image: Union[Path, str]
    mask: Union[Path, str, None]
    packed: Optional[PackedRow] = None

    @property
    def name(self) -> str:
        return Path(self.image).stem

    def describe(self, field: str = "image") -> str:
        """The file (or pack row) to name in an error message."""
        where = self.image if field == "image" else self.mask
        return f"{where} (in {self.packed.file})" if self.packed else str(where)


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


def mask_png(mask: np.ndarray) -> bytes:
    """A palette PNG with a full 256-entry palette (a shorter one silently changes values)."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_mask(mask: np.ndarray, path: Path) -> None:
    Path(path).write_bytes(mask_png(mask))


def load_image(source, label=None) -> np.ndarray:
    """HxWx3 uint8 RGB from a path or a file-like object; `label` names it in errors."""
    label = label or source
    try:
        with Image.open(source) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read image {label}: {exc}") from None


def load_mask(source, num_classes: Optional[int] = None, ignore_index: int = 255, label=None) -> np.ndarray:
    """HxW uint8 class ids (palette indices for palette PNGs), checked against num_classes."""
    label = label or source
    try:
        with Image.open(source) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(f"mask {label} has mode {im.mode!r}; expected a palette or grayscale PNG of class ids")
            mask = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot read mask {label}: {exc}") from None
    if num_classes is not None:
        check_mask_ids(mask, num_classes, ignore_index, label)
    return mask.astype(np.uint8)


def read_image(ref: SampleRef) -> np.ndarray:
    """The sample's image, from its file or its pack row."""
    if ref.packed is None:
        return load_image(ref.image)
    from mkd_ray.data.packed import read_cell

    return load_image(io.BytesIO(read_cell(ref.packed, "image")), ref.describe("image"))


def read_mask(ref: SampleRef, num_classes: Optional[int] = None, ignore_index: int = 255) -> np.ndarray:
    """The sample's mask (it must have one), from its file or its pack row."""
    if ref.packed is None:
        return load_mask(ref.mask, num_classes, ignore_index)
    from mkd_ray.data.packed import read_cell

    return load_mask(io.BytesIO(read_cell(ref.packed, "mask")), num_classes, ignore_index, ref.describe("mask"))


def check_mask_ids(mask: np.ndarray, num_classes: int, ignore_index: int, path) -> None:
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        ids = sorted(int(v) for v in np.unique(mask[bad]))[:10]
        raise DatasetError(
            f"mask {path} has class ids {ids}; valid ids are 0..{num_classes - 1} and {ignore_index} (ignore)"
        )


def parse_split_lines(text: str, origin, need_masks: bool = True) -> list[tuple[int, str, Optional[str]]]:
    """(line number, image, mask or None) for each sample line "<image> [<mask>]"."""
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (need_masks and len(parts) < 2):
            want = "'<image> <mask>'" if need_masks else "'<image> [<mask>]'"
            raise DatasetError(f"{origin}:{lineno}: expected {want}, got {line!r}")
        entries.append((lineno, parts[0], parts[1] if len(parts) == 2 else None))
    if not entries:
        raise DatasetError(f"split file {origin} lists no samples")
    return entries


def read_split_file(path: Path, root: Path, need_masks: bool = True, log=print) -> list[SampleRef]:
    """One sample a line: "<image> [<mask>]", both relative to `root`. Every image must exist,
    and every mask unless `need_masks` is False (an unlabeled list): there a mask may be left
    out, and one named but missing reads as none, with one warning (see `warn_missing_masks`)."""
    path, root = Path(path), Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist (set data.root)")
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    refs, missing = [], []
    for lineno, image, mask in parse_split_lines(path.read_text(), path, need_masks):
        ref = SampleRef(root / image, root / mask if mask else None)
        if not ref.image.is_file():
            raise DatasetError(f"{path}:{lineno}: {ref.image} does not exist")
        if ref.mask is not None and not ref.mask.is_file():
            if need_masks:
                raise DatasetError(f"{path}:{lineno}: {ref.mask} does not exist")
            missing.append(mask)
            ref = SampleRef(ref.image, None)
        refs.append(ref)
    warn_missing_masks(path, missing, len(refs), log)
    return refs


def warn_missing_masks(listing, missing: list[str], total: int, log) -> None:
    """One warning for the masks an unlabeled list names but the dataset lacks. Those masks
    only feed the pseudo-label accuracy diagnostic, so their images train as unlabeled ones
    without ground truth (all ignore) rather than stop the run."""
    if missing:
        log(f"warning: {listing}: {len(missing):,} of the {total:,} masks it names do not exist "
            f"(e.g. {missing[0]}); pseudo-label accuracy leaves those images out")


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
