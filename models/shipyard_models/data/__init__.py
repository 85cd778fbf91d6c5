"""Corpora and generators shared by the model families (pure Python / NumPy / PyTorch)."""
