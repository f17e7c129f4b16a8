"""Paths and filesystems: shard listing, Parquet reading, atomic writing, local copies of
remote directories. Local paths and ``s3://`` URLs are accepted everywhere.

What touches a filesystem is a method of ``Storage``, made from the job's ``storage`` config
(the s3fs options, the cache directory) and handed to whatever needs it: no storage setting
is kept for the whole process. What only computes paths is a function of this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .config import StorageConfig

GLOB_CHARS = "*?["
VERSION_KEYS = ("ETag", "etag", "LastModified", "mtime", "last_modified")


class InputError(ValueError):
    """An input that cannot be read; raised before any model is loaded."""


def is_remote(path: str) -> bool:
    """Whether a path is a URL of a non-local filesystem."""
    return "://" in path and not path.startswith("file://")


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if _is_local(fs) else f"{protocol}://{path}"


def location(path: str) -> str:
    """A canonical form of a path or URL for comparing locations: a local path made absolute
    with every symlink, ``.`` and ``..`` resolved (``os.path.realpath``); a URL as
    ``protocol://bucket/key`` with ``s3a`` read as ``s3``, repeated slashes, ``.`` and ``..``
    collapsed and no trailing slash."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not is_remote(path):
        return os.path.realpath(os.path.expanduser(path))
    protocol, rest = path.split("://", 1)
    protocol = {"s3a": "s3", "s3n": "s3"}.get(protocol.lower(), protocol.lower())
    key = posixpath.normpath("/" + rest).lstrip("/")
    return f"{protocol}://{key}"


def inside(path: str, root: str) -> bool:
    """Whether canonical location ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _below(path: str, root: str) -> str:
    """``path`` relative to ``root`` (its base name when it is not below it)."""
    root = root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else posixpath.basename(path)


def is_metadata(relative: str) -> bool:
    """Whether a file below an input directory is metadata, not a shard: some part of its path
    (relative to that directory) starts with ``.`` or ``_`` (as Spark and Ray Data treat them)."""
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def is_parquet_name(name: str) -> bool:
    """Whether a file name ends with ``.parquet`` (in any case)."""
    return name.lower().endswith(".parquet")


def shard_stem(shard: str) -> str:
    """The shard's file name without its ``.parquet`` extension (any case): the name of its output file."""
    name = posixpath.basename(shard.rstrip("/"))
    return name[: -len(".parquet")] if is_parquet_name(name) else name


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    return posixpath.join(base.rstrip("/"), *parts)


def child(base: str, *names: str) -> str:
    """``base`` joined with ``names`` that are each exactly one path component (no separator,
    not ``.`` or ``..``, no NUL): a path built this way cannot leave ``base``. Every name under
    an output that comes from outside (shard stems, run ids) goes through here."""
    for name in names:
        if not is_component(name):
            raise ValueError(f"{name!r} is not a single path component")
    return join(base, *names)


def is_component(name: str) -> bool:
    """Whether ``name`` is exactly one path component: not empty, ``.`` or ``..``, no separator, no NUL."""
    return name not in ("", ".", "..") and not any(ch in name for ch in "/\\\0")


def temporary_path(path: str) -> str:
    """A hidden, unique name next to ``path`` (``.{name}.{uuid}.tmp``) to write under before a
    rename into place; ``Storage.remove_temporaries`` recognises it."""
    return join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def replacing(fs: fsspec.AbstractFileSystem, path: str):
    """A temporary name next to ``path`` to write under; renamed into place when the block ends,
    removed when it fails (a full disk's partial file neither lingers nor keeps the space)."""
    tmp = temporary_path(path)
    try:
        yield tmp
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # noqa: BLE001 - never opened, or already gone; the start of the next run sweeps
            pass
        raise
    fs.mv(tmp, path)


def make_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the local directory a file goes in (object stores need none)."""
    # Only local filesystems need directories; on object stores makedirs could create a bucket.
    if _is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return protocol in ("file", "local")


def listing_fingerprint(files: dict[str, dict]) -> str:
    """A digest of a listing (``fs.find(path, detail=True)``: names, sizes, ETags or modification
    times): it changes when a file is added, removed or replaced."""
    lines = []
    for name, info in sorted(files.items()):
        stamp = next((info[k] for k in VERSION_KEYS if k in info), "")
        lines.append(f"{name}\t{info.get('size')}\t{stamp}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def directory_fingerprint(path: str, sample_bytes: int = 4 << 20) -> str:
    """A digest of a local directory's files: their relative names, sizes and contents (of a
    file larger than twice ``sample_bytes``, its first and last ``sample_bytes``, so that a
    model of many gigabytes is fingerprinted in a moment)."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\t{size}\n".encode())
        with open(file, "rb") as f:
            if size <= 2 * sample_bytes:
                digest.update(f.read())
            else:
                digest.update(f.read(sample_bytes))
                f.seek(size - sample_bytes)
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:16]


class Storage:
    """The filesystems of one job: local paths, and ``s3://`` URLs through s3fs with the options
    of its ``storage`` config; remote models and indexes are copied to its ``cache_dir``.

    It keeps only the config (a filesystem is made when a path needs it), so it pickles small
    and travels to Ray workers; two made from equal configs are equal (and hash alike)."""

    def __init__(self, config: StorageConfig | None = None):
        self.config = config if config is not None else StorageConfig()
        self._key = json.dumps(dataclasses.asdict(self.config), sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Storage({self.config!r})"

    @property
    def cache_dir(self) -> str:
        """This node's cache directory (``storage.cache_dir``)."""
        return self.config.cache_dir

    def filesystem(self, path: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for a path or URL, and the path within it."""
        if path.startswith(("s3://", "s3a://")):
            storage = self.config
            options = dict(storage.s3_options)
            client_kwargs = dict(options.pop("client_kwargs", {}))
            if storage.region:
                client_kwargs["region_name"] = storage.region
            fs = fsspec.filesystem("s3", anon=storage.anonymous, endpoint_url=storage.endpoint_url,
                                   client_kwargs=client_kwargs, **options)
            return fs, fs._strip_protocol(path)
        return fsspec.core.url_to_fs(path)

    def input_location(self, given: str) -> str:
        """The canonical location an input path covers: a directory itself, a file's directory,
        a glob's directory part before its first wildcard."""
        fs, path = self.filesystem(given)
        for i, ch in enumerate(given):
            if ch in GLOB_CHARS:
                return location(posixpath.dirname(given[:i]) or ".")
        try:
            is_dir = fs.isdir(path)
        except Exception:  # noqa: BLE001 - unreachable: treat it as a directory (the stricter reading)
            is_dir = True
        return location(given if is_dir else posixpath.dirname(given.rstrip("/")) or ".")

    def list_shards(self, paths: list[str]) -> list[str]:
        """Expand directories (the ``*.parquet`` files below them, any case, metadata files
        starting with ``.`` or ``_`` left out), globs (metadata left out) and files into a
        sorted list of shards.

        Raises InputError naming the path when a path matches nothing or cannot be listed.
        """
        shards: list[str] = []
        for given in paths:
            try:
                fs, path = self.filesystem(given)
                if any(ch in path for ch in GLOB_CHARS):
                    fixed = posixpath.dirname(path[:min(path.index(ch) for ch in GLOB_CHARS if ch in path)])
                    found = sorted(p for p, info in fs.glob(path, detail=True).items()
                                   if info.get("type") != "directory" and not is_metadata(_below(p, fixed)))
                elif fs.isdir(path):
                    found = sorted(p for p in fs.find(path) if is_parquet_name(p) and not is_metadata(_below(p, path)))
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

    def read_footer(self, shard: str) -> tuple[pa.Schema, int]:
        """A Parquet shard's Arrow schema and row count (footer only); InputError naming the shard
        if it is not readable Parquet."""
        try:
            fs, path = self.filesystem(shard)
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                return parquet.schema_arrow, parquet.metadata.num_rows
        except Exception as exc:
            raise InputError(f"cannot read Parquet shard {shard}: {type(exc).__name__}: {exc}") from None

    def read_table(self, shard: str) -> pa.Table:
        """A whole Parquet shard as one table."""
        fs, path = self.filesystem(shard)
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    def read_columns(self, shard: str, names: tuple[str, ...] | list[str]) -> pa.Table:
        """The columns of ``names`` that a Parquet shard has (only those are read)."""
        fs, path = self.filesystem(shard)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            return parquet.read(columns=[n for n in names if n in parquet.schema_arrow.names])

    def read_column(self, shard: str, name: str) -> pa.ChunkedArray:
        """One column of a Parquet shard (only that column is read)."""
        fs, path = self.filesystem(shard)
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=[name]).column(name)

    def write_parquet_atomic(self, table: pa.Table, dest: str) -> None:
        """Write a Parquet file under a temporary name, then rename it into place.

        Readers never see a partial file at ``dest``.
        """
        fs, path = self.filesystem(dest)
        make_parent(fs, path)
        with replacing(fs, path) as tmp, fs.open(tmp, "wb") as f:
            pq.write_table(table, f)

    def write_text(self, dest: str, text: str) -> None:
        """Write a small text file (config, manifest, marker) under a temporary name, then rename it."""
        fs, path = self.filesystem(dest)
        make_parent(fs, path)
        with replacing(fs, path) as tmp, fs.open(tmp, "w") as f:
            f.write(text)

    def check_writable(self, path: str) -> None:
        """Raise (naming the path) unless an output location can be written: for s3://, the bucket
        must exist (it is never created); locally, the directory is created and a probe file
        written and removed, and the directories that did not exist before are removed again."""
        fs, p = self.filesystem(path)
        if _is_local(fs):
            target = Path(p).absolute()
            created, existing = [], target
            while not existing.exists():
                created.append(existing)
                existing = existing.parent
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is not a directory")
            try:
                target.mkdir(parents=True, exist_ok=True)
                probe = target / f".selfrag-probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            finally:
                for directory in created:  # deepest first
                    try:
                        directory.rmdir()
                    except OSError:
                        pass
            return
        bucket = p.split("/", 1)[0]
        if not fs.exists(bucket):
            raise FileNotFoundError(f"bucket does not exist: {path.split('://', 1)[0]}://{bucket}")

    def remove_temporaries(self, directory: str) -> int:
        """Delete the temporary files (``.{name}.{uuid}.tmp``) an interrupted write left directly in a
        directory; returns how many. Only for a directory no one else writes (a run holding its lease)."""
        fs, root = self.filesystem(directory)
        fs.invalidate_cache(root)
        if not fs.exists(root):
            return 0
        found = [p for p in fs.ls(root, detail=False)
                 if posixpath.basename(p).startswith(".") and posixpath.basename(p).endswith(".tmp")]
        for path in found:
            fs.rm(path)
        return len(found)

    def exists(self, path: str) -> bool:
        """Whether a file or directory exists at a local path or URL."""
        fs, p = self.filesystem(path)
        return fs.exists(p)

    def read_text(self, path: str) -> str:
        """A small text file's content (UTF-8), read with one GET, not through s3fs's cached
        listing of its folder: once, in the test of eight runs taking over a lease on S3, a
        listing cached before the winner wrote its record made that record "not found"."""
        fs, p = self.filesystem(path)
        return fs.cat_file(p).decode("utf-8")

    def read_json(self, path: str) -> dict | list | None:
        """A small JSON file, or None when it is absent or unreadable (e.g. partly written)."""
        try:
            return json.loads(self.read_text(path)) if self.exists(path) else None
        except (ValueError, OSError):
            return None

    def remove(self, path: str) -> None:
        """Delete a file if it exists."""
        fs, p = self.filesystem(path)
        if fs.exists(p):
            fs.rm(p)

    def file_version(self, path: str) -> dict:
        """What tells one version of a file from another without reading it: ``{"size", "stamp"}``,
        the stamp being the object's ETag on S3 (its content digest) or the modification time on disk."""
        fs, p = self.filesystem(path)
        info = fs.info(p)
        stamp = next((info[k] for k in VERSION_KEYS if k in info), "")
        return {"size": int(info.get("size") or 0), "stamp": str(stamp).strip('"')}

    def localize(self, path: str, only: tuple[str, ...] | None = None, flat: bool = False) -> str:
        """A local directory with the content of ``path``: the path itself when local, else a copy
        in ``cache_dir``, downloaded once per node (replicas on a node share it). The copy is
        keyed by the URL and the remote listing, so a model or index replaced at the same URL
        is downloaded again. ``only``: copy just the files with these names (e.g. a model's
        tokenizer files, not its weights). ``flat``: only the files directly in ``path``, none of
        its subdirectories (an index version of the old layout, beside newer versions)."""
        if not is_remote(path):
            return path
        fs, remote = self.filesystem(path)
        if not fs.exists(remote):
            raise FileNotFoundError(f"not found: {path}")
        found = fs.find(remote, maxdepth=1, detail=True) if flat else fs.find(remote, detail=True)
        files = {name: info for name, info in found.items()
                 if only is None or posixpath.basename(name) in only}
        key = hashlib.sha256(f"{path}\n{only}\n{listing_fingerprint(files)}".encode()).hexdigest()[:16]
        dest = Path(self.cache_dir) / key
        if (dest / ".complete").exists():
            return str(dest)
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir(parents=True)
        root = remote.rstrip("/") + "/"
        for name in files:
            target = tmp / name[len(root):]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get(name, str(target))
        (tmp / ".complete").write_text(path)
        try:
            os.rename(tmp, dest)
        except OSError:  # another replica finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)

    def upload_dir(self, local: str, dest: str) -> None:
        """Copy a local directory's files to ``dest`` (a URL or local path)."""
        fs, remote = self.filesystem(dest)
        for name in sorted(os.listdir(local)):
            fs.put(os.path.join(local, name), posixpath.join(remote, name))

    def sha256(self, path: str) -> str:
        """Hex SHA-256 of a file's bytes (a corpus fingerprint)."""
        fs, p = self.filesystem(path)
        digest = hashlib.sha256()
        with fs.open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
