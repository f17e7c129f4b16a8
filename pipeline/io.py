"""Paths and filesystems: input shard listing, Parquet reading and atomic writing over fsspec.

Local paths and any fsspec URL (``s3://`` through s3fs) are accepted.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class InputError(ValueError):
    """An input that cannot be read; raised before any model is loaded."""


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a path or URL, and the path within it."""
    return fsspec.core.url_to_fs(path)


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_shards(paths: list[str]) -> list[str]:
    """Expand directories (their ``*.parquet``), globs and files into a sorted list of shards.

    Raises InputError naming the path when a path matches nothing or cannot be listed.
    """
    shards: list[str] = []
    for given in paths:
        try:
            fs, path = filesystem(given)
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
            elif fs.isdir(path):
                found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
            elif fs.exists(path):
                found = [path]
            else:
                raise InputError(f"input path does not exist: {given}")
        except InputError:
            raise
        except Exception as exc:  # permissions, endpoint, credentials: one clear line
            raise InputError(f"cannot list input path {given}: {type(exc).__name__}: {exc}") from None
        if not found:
            raise InputError(f"no Parquet shards found at {given}")
        shards.extend(_with_protocol(fs, p) for p in found)
    if len(set(shards)) != len(shards):
        raise InputError("an input shard is listed more than once")
    return shards


def read_schema(shard: str) -> pa.Schema:
    """The Arrow schema of a Parquet shard (footer only); InputError naming the shard if unreadable."""
    try:
        fs, path = filesystem(shard)
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except Exception as exc:
        raise InputError(f"cannot read Parquet shard {shard}: {type(exc).__name__}: {exc}") from None


def read_table(shard: str) -> pa.Table:
    """A whole Parquet shard as one table."""
    fs, path = filesystem(shard)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def shard_stem(shard: str) -> str:
    """The shard's file name without its extension: the name of its output file."""
    name = posixpath.basename(shard.rstrip("/"))
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    return posixpath.join(base.rstrip("/"), *parts)


def write_parquet_atomic(table: pa.Table, dest: str) -> None:
    """Write a Parquet file under a temporary name, then rename it into place.

    Readers never see a partial file at ``dest``.
    """
    fs, path = filesystem(dest)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def write_text(dest: str, text: str) -> None:
    """Write a small text file (config, manifest)."""
    fs, path = filesystem(dest)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)
