"""Subcommands that live next to their library code. Each module has register(subparsers)."""

from . import quantize

REGISTRY: list = [quantize.register]
