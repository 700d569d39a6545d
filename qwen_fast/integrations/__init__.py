"""Hugging Face transformers hookup."""

from .interfaces import register  # noqa: F401  (the public entry point)
