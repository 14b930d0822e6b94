"""Assayer: evaluate every checkpoint of a training run on Redis Queue workers."""

__version__ = "0.1.0"
