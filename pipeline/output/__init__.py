"""An output location and the state of the runs that write it: the folder (the location, its
storage and every name under it), the output's schema, the annotation identity, the lease,
staged rows and success markers, the manifest and the run logs."""
