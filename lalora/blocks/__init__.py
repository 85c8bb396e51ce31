"""Block types a ``Precision`` is made of (one algebra over all representations)."""
from .base import Block, block_class, register_block
from .dense import DenseBlock
from .diag import DiagBlock

__all__ = ["Block", "DenseBlock", "DiagBlock", "block_class", "register_block"]
