"""What every part of a run is built from, knowing nothing of runs: the config, credentials
kept out of it, paths and filesystems (local and ``s3://``), and console lines."""
