"""Subcommands that live next to their library code. Each module has register(subparsers)."""

from . import quantize, transforms

REGISTRY: list = [quantize.register, transforms.register]
