"""Seeded labeled/unlabeled splits, written as UniMatch-style lists."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

from mkd_ray.data.io import DatasetError, SampleRef, write_split_file


def labeled_count(spec: str, total: int) -> int:
    """'1_16' -> total // 16 (a fraction), '92' -> 92 (a count)."""
    try:
        if "_" in spec or "/" in spec:
            num, den = spec.replace("/", "_").split("_")
            count = int(Fraction(int(num), int(den)) * total)
        else:
            count = int(spec)
    except ValueError:
        raise DatasetError(f"split {spec!r}: expected a fraction like '1_16' or a count like '92'") from None
    if not 0 < count <= total:
        raise DatasetError(f"split {spec!r} asks for {count} labeled images out of {total}")
    return count


def make_splits(refs: list[SampleRef], specs: list[str], seed: int = 0) -> dict[str, tuple[list[SampleRef], list[SampleRef]]]:
    """One seeded permutation for all splits, so smaller labeled sets are subsets of larger ones."""
    order = list(refs)
    random.Random(seed).shuffle(order)
    out = {}
    for spec in specs:
        k = labeled_count(spec, len(order))
        out[spec] = (order[:k], order[k:])
    return out


def write_splits(refs: list[SampleRef], specs: list[str], out_dir: Path, root: Path, seed: int = 0) -> list[Path]:
    """<out_dir>/<spec>/labeled.txt and unlabeled.txt for each spec; returns the folders."""
    folders = []
    for spec, (labeled, unlabeled) in make_splits(refs, specs, seed).items():
        folder = Path(out_dir) / spec
        write_split_file(folder / "labeled.txt", labeled, root)
        write_split_file(folder / "unlabeled.txt", unlabeled, root)
        folders.append(folder)
    return folders
