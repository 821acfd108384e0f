"""Subcommands that live next to their library code. Each module has register(subparsers)."""

from . import bench, evals, imatrix, quantize, serve, transforms

REGISTRY: list = [quantize.register, imatrix.register, transforms.register, bench.register, evals.register,
                  serve.register]
