"""The driver's runtime on a Ray cluster: connecting to Ray, the job's metrics actor, progress
on the console, when each phase of the run was reached, and the phases a signal may hit."""
