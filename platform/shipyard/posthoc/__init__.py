"""Post-hoc stages: work on a finished checkpoint of any earlier run (e.g. `laplace`)."""
