"""The `fedspeaker` command: the composition root, the only core module that may import
server/, client/ or simulations/ (tests/test_layers.py keeps it so)."""

from fedspeaker.cli.main import main

__all__ = ["main"]
