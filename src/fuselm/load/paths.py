"""What a model argument names: a path, a one-model folder, or "demo" (the bundled model)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FuselmError

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo" / "weights"


def resolve_model_path(path: str | Path | None) -> Path:
    """"demo" (or None) is the bundled model; a folder holding exactly one model .gguf (besides its -vqgan
    companion) and no config.json is that file. Errors name the path."""
    if path is None or str(path) == "demo":
        path = DEMO_DIR
    path = Path(path)
    if not path.exists():
        raise FuselmError(f"{path}: no such file or directory")
    if path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists():
        ggufs = sorted(p for p in path.glob("*.gguf") if not p.name.endswith("-vqgan.gguf"))
        if len(ggufs) != 1:
            raise FuselmError(f"{path}: expected exactly one model .gguf file, found {[p.name for p in ggufs]}")
        path = ggufs[0]
    return path
