"""Pure-PyTorch models of the papers Shipyard trains; one sub-package per paper.

Nothing here imports ray, mlflow, deepspeed or shipyard: the platform applies parallelism,
tracking and storage from outside through the small `Family` seam (see `family.py`).
"""
