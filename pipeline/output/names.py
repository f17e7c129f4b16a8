"""The names under an output location, in one place: every file and directory a run writes
beside its shards (one Parquet file per input shard, named after it)."""

#: One success marker per committed shard (``<shard stem>.json``).
DONE_DIR = "_done"
#: Staged rows of shards not committed yet, per annotation identity.
STAGING_DIR = "_staging"
#: The lease that lets one run at a time write the output.
LEASE_DIR = "_lease"
#: Each run's log file.
LOGS_DIR = "_logs"
#: The resolved config of the last run.
CONFIG_FILE = "_config.yaml"
#: The last run's manifest: counts, phases, stage metrics, the annotation identity.
MANIFEST_FILE = "_manifest.json"
#: Every run's summary, for the report's history.
HISTORY_FILE = "_history.json"
#: The run report.
REPORT_FILE = "report.html"
