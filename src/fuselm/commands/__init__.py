"""Subcommands that live next to their library code. Each module has register(subparsers)."""

REGISTRY: list = []
