"""Locations that are local paths or pyarrow filesystem URIs (s3://, gs://, abfs://, hdfs://, file://).

Packs, run checkpoints and sweeps can live on storage every node of a cluster reaches; these
helpers read and write both kinds the same way.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location that cannot be opened or read."""


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | Path) -> str:
    """An absolute local path, or the URI unchanged (every process then means the same place)."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (pathlib would collapse 's3://')."""
    return "/".join([str(location).rstrip("/"), *parts])


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a location and the path within it."""
    try:
        return pafs.FileSystem.from_uri(resolve(location))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise StorageError(f"cannot open {location}: {exc} (give a local path or a pyarrow URI such as "
                           "s3://bucket/path)") from None


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        raise StorageError(f"{location} does not exist") from None


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(location: str, data: bytes) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def children(location: str) -> list[str]:
    """Names directly under a folder (empty if it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)
