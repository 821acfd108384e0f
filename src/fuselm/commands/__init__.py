"""Subcommands that live next to their library code. Each module has register(subparsers)."""

from . import bench, quantize, transforms

REGISTRY: list = [quantize.register, transforms.register, bench.register]
