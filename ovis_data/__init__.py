"""Ovis data engine: registry, fetch, validate, pack."""

__version__ = "0.1.0"
