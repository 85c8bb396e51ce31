"""Block types a ``Precision`` is made of (one algebra over all representations).

Every built-in kind is imported here, so it is registered (``block_class``) whenever the package is: ``base``
(the interface and the registry) imports no kind, each kind imports ``base``."""
from .base import Block, block_class, register_block
from .dense import DenseBlock
from .diag import DiagBlock
from .factored import FactoredBlock
from .kronecker import KFACBlock, TriKFACBlock

__all__ = ["Block", "DenseBlock", "DiagBlock", "FactoredBlock", "KFACBlock", "TriKFACBlock", "block_class",
           "register_block"]
