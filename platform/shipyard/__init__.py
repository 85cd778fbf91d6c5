"""Shipyard: declarative distributed training of research models on Ray.

`shipyard.spec` reads job specs, `shipyard.train` runs them on Ray Train, `shipyard.cli` is the
command line. Models live in the separate, pure-PyTorch package `shipyard_models`.
"""
__version__ = "0.1.0"
