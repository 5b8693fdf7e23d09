"""Parquet packs: a dataset's images and masks as Parquet shards on any pyarrow filesystem.

A pack holds every sample its source's split files name, once, as the encoded bytes of
the original files, plus those split files, unchanged:

    <pack>/part-00000.parquet ...   columns image_path, image, mask_path, mask
    <pack>/splits/...               the source's val.txt and <split>/{labeled,unlabeled}.txt
    <pack>/pack.json                written last: a pack without it is incomplete

Split lines keep naming relative paths; in a pack they are keys of the `image_path`
column. Row groups are small (one sample by default), so reading sample i is one ranged
read, as reading one file of a folder is: the training stream keeps its seeded draw
order (and its exact resume), whether the pack is on local disk or object storage.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mkd_ray.data.io import DatasetError, PackedRow, SampleRef, parse_split_lines, warn_missing_masks
from mkd_ray.storage import exists, filesystem, join, read_text, write_bytes

MANIFEST = "pack.json"
FORMAT = "mkd_ray.pack/1"
SCHEMA = pa.schema([
    ("image_path", pa.string()),
    ("image", pa.binary()),
    ("mask_path", pa.string()),
    ("mask", pa.binary()),
])


# -- writing -------------------------------------------------------------------------

def _source_lists(splits_dir: Path) -> list[Path]:
    lists = sorted(splits_dir.rglob("*.txt"))
    if not lists:
        raise DatasetError(f"no split files (*.txt) under {splits_dir}; run `run.py data splits` first")
    return lists


def _samples_named(root: Path, lists: list[Path]) -> dict[str, str | None]:
    """image path -> mask path (or None) for every sample any split file names. A mask an
    unlabeled list names but the dataset lacks is packed as none, as training reads it
    (io.read_split_file); any other missing file is an error."""
    samples: dict[str, str | None] = {}
    for listing in lists:
        masks_optional = listing.name == "unlabeled.txt"
        for lineno, image, mask in parse_split_lines(listing.read_text(), listing, need_masks=False):
            if not (root / image).is_file():
                raise DatasetError(f"{listing}:{lineno}: {root / image} does not exist")
            if mask is not None and not (root / mask).is_file():
                if not masks_optional:
                    raise DatasetError(f"{listing}:{lineno}: {root / mask} does not exist")
                mask = None
            samples[image] = mask or samples.get(image)
    return samples


def write_pack(root: Path, splits_dir: Path, out: str, rows_per_file: int = 256, rows_per_group: int = 1) -> dict:
    """Pack the samples named by the split files under `splits_dir` (paths relative to
    `root`) into `out`, a local path or URI that must not hold a pack or anything else."""
    root, splits_dir = Path(root), Path(splits_dir)
    fs, base = filesystem(out)
    if fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        raise DatasetError(f"--out {out} is not empty; give a new location (nothing was written)")
    started = time.perf_counter()
    lists = _source_lists(splits_dir)
    samples = list(_samples_named(root, lists).items())
    fs.create_dir(base, recursive=True)
    files = []
    for start in range(0, len(samples), rows_per_file):
        chunk = samples[start:start + rows_per_file]
        table = pa.table({
            "image_path": [image for image, _ in chunk],
            "image": [(root / image).read_bytes() for image, _ in chunk],
            "mask_path": [mask for _, mask in chunk],
            "mask": [(root / mask).read_bytes() if mask else None for _, mask in chunk],
        }, schema=SCHEMA)
        name = f"part-{len(files):05d}.parquet"
        pq.write_table(table, join(base, name), filesystem=fs, row_group_size=rows_per_group,
                       compression="none", write_statistics=False)
        files.append({"path": name, "rows": len(chunk)})
    for listing in lists:
        write_bytes(join(out, "splits", listing.relative_to(splits_dir).as_posix()), listing.read_bytes())
    manifest = {"format": FORMAT, "rows": len(samples), "rows_per_group": rows_per_group, "files": files,
                "source": str(root), "seconds": round(time.perf_counter() - started, 2)}
    write_bytes(join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


# -- reading -------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def pack_index(location: str) -> dict[str, tuple[PackedRow, bool]]:
    """image path -> (its row, whether it has a mask), from the manifest and the path columns."""
    manifest_at = join(location, MANIFEST)
    if not exists(manifest_at):
        raise DatasetError(f"{location} is not a Parquet pack: {manifest_at} is missing "
                           "(write one with `run.py data pack`, or set data.format=folder)")
    manifest = json.loads(read_text(manifest_at))
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{manifest_at}: format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    index = {}
    for entry in manifest["files"]:
        file = join(location, entry["path"])
        parquet = _parquet_file(file)  # the handle later reads of this file reuse
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["image_path", "mask_path"])
            for row, (image, mask) in enumerate(zip(*(c.to_pylist() for c in table.columns))):
                index[image] = (PackedRow(file, group, row), mask is not None)
    return index


def read_split(location: str, pack: str, need_masks: bool = True, log=print) -> list[SampleRef]:
    """A split file whose lines name samples of the pack at `pack`; masks as in
    io.read_split_file (optional, with one warning when missing, if `need_masks` is False)."""
    index = pack_index(pack)
    refs, missing = [], []
    for lineno, image, mask in parse_split_lines(read_text(location), location, need_masks):
        if image not in index:
            raise DatasetError(f"{location}:{lineno}: {image} is not in the pack {pack}")
        row, has_mask = index[image]
        if mask is not None and not has_mask:
            if need_masks:
                raise DatasetError(f"{location}:{lineno}: the pack {pack} holds no mask for {image}")
            missing.append(mask)
            mask = None
        refs.append(SampleRef(image, mask, row))
    warn_missing_masks(location, missing, len(refs), log)
    return refs


@functools.lru_cache(maxsize=64)
def _parquet_file(file: str) -> pq.ParquetFile:
    fs, path = filesystem(file)
    return pq.ParquetFile(fs.open_input_file(path))


def read_cell(row: PackedRow, column: str) -> bytes:
    """The bytes of one column of one packed sample (one ranged read of its row group)."""
    table = _parquet_file(row.file).read_row_group(row.row_group, columns=[column])
    value = table.column(0)[row.row].as_py()
    if value is None:
        raise DatasetError(f"{row.file}: row {row.row} of row group {row.row_group} has no {column}")
    return value
