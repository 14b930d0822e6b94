"""Assayer: evaluate every checkpoint of a training run on Redis Queue workers."""

from .errors import Retry

__version__ = "0.1.0"
__all__ = ["Retry", "__version__"]
