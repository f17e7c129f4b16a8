"""An output location and every name under it, in one place: one Parquet file per input shard
(named after it), and beside the shards the files and directories a run writes. Nothing else
joins these names onto an output's path."""

from __future__ import annotations

import json

from ..infra.config import Config
from ..infra.io import Storage, child, is_remote, join, shard_stem

#: One success marker per committed shard (``<shard stem>.json``).
DONE_DIR = "_done"
#: Staged rows of shards not committed yet, per annotation identity and shard.
STAGING_DIR = "_staging"
#: Beside a shard's staged rows: the version of the input shard they annotate.
STAGED_VERSION_FILE = "_input.json"
#: The lease that lets one run at a time write the output.
LEASE_DIR = "_lease"
#: Each run's log file.
LOGS_DIR = "_logs"
#: The resolved config of the last run.
CONFIG_FILE = "_config.yaml"
#: The name other tools give the config, read when ``CONFIG_FILE`` is absent.
OTHER_CONFIG_FILE = "config.yaml"
#: The last run's manifest: counts, phases, stage metrics, the annotation identity.
MANIFEST_FILE = "_manifest.json"
#: Every run's summary, for the report's history.
HISTORY_FILE = "_history.json"
#: The run report.
REPORT_FILE = "report.html"


class OutputFolder:
    """An output location (local or s3://), the storage it is read and written with, and every
    name under it. Picklable: a Ray Data stage may take one along."""

    def __init__(self, path: str, storage: Storage):
        self.path, self.storage = path, storage

    @classmethod
    def of(cls, cfg: Config) -> "OutputFolder":
        """The output of an annotation run: ``output.path``, with the run's storage options."""
        return cls(cfg.output.path, Storage(cfg.storage))

    def __repr__(self) -> str:
        return f"OutputFolder({self.path!r})"

    @property
    def is_remote(self) -> bool:
        """Whether the location is a URL (an object store), not a local directory."""
        return is_remote(self.path)

    # ------------------------------------------------------------------ names

    def shard_file(self, shard: str) -> str:
        """Where the output of an input shard goes (``{shard stem}.parquet``)."""
        return child(self.path, f"{shard_stem(shard)}.parquet")

    def marker(self, shard: str) -> str:
        """The success marker of a shard's output: written only after its data file is complete
        (and before its staged parts are dropped)."""
        return child(self.path, DONE_DIR, f"{shard_stem(shard)}.json")

    @property
    def done_dir(self) -> str:
        """The directory of the success markers."""
        return join(self.path, DONE_DIR)

    @property
    def staging_dir(self) -> str:
        """The directory of all staged rows (one directory per annotation hash in it)."""
        return join(self.path, STAGING_DIR)

    def staged_shard_dir(self, annotation_hash: str, shard: str) -> str:
        """Where a shard's parts staged under an annotation identity live."""
        return child(self.path, STAGING_DIR, annotation_hash, shard_stem(shard))

    def staged_version(self, annotation_hash: str, shard: str) -> str:
        """The file that records which version of the input shard its staged rows annotate."""
        return join(self.staged_shard_dir(annotation_hash, shard), STAGED_VERSION_FILE)

    @property
    def lease_dir(self) -> str:
        """The directory of the lease's records."""
        return join(self.path, LEASE_DIR)

    def log_file(self, name: str) -> str:
        """A run's log file, ``name`` being one path component."""
        return child(self.path, LOGS_DIR, name)

    @property
    def config_file(self) -> str:
        """The resolved config of the last run."""
        return join(self.path, CONFIG_FILE)

    @property
    def other_config_file(self) -> str:
        """The config as other tools name it (read when ``config_file`` is absent)."""
        return join(self.path, OTHER_CONFIG_FILE)

    @property
    def manifest_file(self) -> str:
        """The last run's manifest."""
        return join(self.path, MANIFEST_FILE)

    @property
    def history_file(self) -> str:
        """The summaries of the runs reported here."""
        return join(self.path, HISTORY_FILE)

    @property
    def report_file(self) -> str:
        """The report page."""
        return join(self.path, REPORT_FILE)

    # ------------------------------------------------------------- operations

    def exists(self, path: str) -> bool:
        """Whether a file or directory under the output exists."""
        return self.storage.exists(path)

    def read_text(self, path: str) -> str:
        """A small text file under the output."""
        return self.storage.read_text(path)

    def read_json(self, path: str) -> dict | list | None:
        """A small JSON file under the output, or None when it is absent or unreadable."""
        return self.storage.read_json(path)

    def write_text(self, path: str, text: str) -> None:
        """Write a small text file under the output (under a temporary name, then renamed)."""
        self.storage.write_text(path, text)

    def write_json(self, path: str, data, indent: int | None = None) -> None:
        """Write ``data`` as a small JSON file under the output (as ``write_text``)."""
        self.storage.write_text(path, json.dumps(data, indent=indent))

    def remove(self, path: str) -> None:
        """Delete a file under the output if it exists."""
        self.storage.remove(path)

    def remove_temporaries(self) -> int:
        """Delete the temporary files interrupted writes left beside the shards and the markers;
        returns how many. Only for a run holding the output's lease."""
        return sum(self.storage.remove_temporaries(d) for d in (self.path, self.done_dir))

    def check_writable(self) -> None:
        """Raise (naming the path) unless the location can be written (``Storage.check_writable``)."""
        self.storage.check_writable(self.path)

    def list_shards(self) -> list[str]:
        """The output's shard files, sorted (InputError when there are none)."""
        return self.storage.list_shards([self.path])
