"""Running a job spec on Ray Train: launch (driver), loop (workers), parallelize, checkpoint, tracking."""
