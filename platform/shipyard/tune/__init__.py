"""Hyperparameter sweeps with Ray Tune over Shipyard jobs (see `shipyard.tune.spec` and `.sweep`)."""
