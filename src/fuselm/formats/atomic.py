"""Atomic writes: every output is written to a hidden `.NAME.PID.RANDOM.partial` file beside it, then renamed.

- The temporary file is created with mode 0666 minus the umask (not mkstemp's 0600), so outputs get normal modes.
- It is removed on any exception, on KeyboardInterrupt (SIGINT), on SIGTERM and SIGHUP (a handler removes the
  live temporary files and then lets the signal do what it did before), and at interpreter exit.
- SIGKILL cannot be caught: the next write to the same destination removes the `.partial` files whose process is
  gone, and says so on stderr.
- A main file and its companion (a GGUF and its `-vqgan.gguf`) are committed as a pair: both are written and
  synced first, then the companion is renamed into place, then the main file. Interrupted between the two renames
  by an exception or a signal, the companion already renamed is removed again. A reader can therefore trust that
  a main file names a companion that exists (formats.gguf records a shared id in both); after SIGKILL between the
  renames, the next write of the pair replaces the lone companion.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import FuselmError

PARTIAL_SUFFIX = ".partial"
_HANDLED_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

_lock = threading.RLock()
_live: set[Path] = set()  # temporary files of writes in progress, removed on signals and at exit
_half_committed: set[Path] = set()  # outputs of a set renamed before the rest of the set: undone on failure
_previous_handlers: dict[int, object] = {}
_active_writes = 0


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def clean_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove `.partial` files left beside `path` by runs that no longer exist; returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{_glob_escape(path.name)}.*{PARTIAL_SUFFIX}"):
        pid = _pid_of(candidate, path.name)
        if pid is None or _alive(pid):
            continue
        try:
            candidate.unlink()
        except OSError as err:
            print(f"warning: cannot remove {candidate}, left by an interrupted run ({err.strerror})", file=sys.stderr)
            continue
        print(f"note: removed {candidate}, left by an interrupted run (process {pid})", file=sys.stderr)
        removed.append(candidate)
    return removed


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on failure it is removed."""
    with atomic_set([path]) as (tmp,):
        yield tmp


@contextmanager
def commit_pair(main: str | os.PathLike, companion: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """Yield (main temporary path, companion temporary path); on success the companion is renamed into place
    first, then the main file, so a main file never appears without its companion."""
    with atomic_set([companion, main]) as (companion_tmp, main_tmp):
        yield main_tmp, companion_tmp


@contextmanager
def atomic_set(paths: list[str | os.PathLike]) -> Iterator[tuple[Path, ...]]:
    """Temporary files for several outputs, renamed into place in the given order once all are written."""
    targets = [Path(p) for p in paths]
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FuselmError(f"{target}: cannot create its folder {target.parent} ({err.strerror})") from None
        clean_stale_partials(target)
    temps = []
    _begin()
    try:
        for target in targets:
            tmp = partial_path(target)
            with _lock:
                _live.add(tmp)
            temps.append(tmp)
            _create(tmp, target)
        yield tuple(temps)
        for tmp in temps:
            _fsync(tmp)
        for tmp, target in zip(temps, targets):
            with _lock:  # registered first: a signal right after the rename must find it
                _half_committed.add(target)
            try:
                os.replace(tmp, target)
            except BaseException:
                if tmp.exists():  # not renamed (an OSError, or KeyboardInterrupt just before): target is not ours
                    with _lock:
                        _half_committed.discard(target)
                raise
            with _lock:
                _live.discard(tmp)
        with _lock:
            _half_committed.difference_update(targets)
        _fsync_dir(targets[0].parent)
    finally:
        for tmp in temps:
            _remove(tmp)
        _undo_half_commit(targets)
        _end()


def _create(tmp: Path, target: Path) -> None:
    try:  # 0o666 & ~umask, exclusively (a name clash is not silently shared)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise FuselmError(f"{target}: cannot write in {target.parent} ({err.strerror})") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    with _lock:
        _live.discard(tmp)
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


def _undo_half_commit(targets: list[Path]) -> None:
    """A set interrupted between its renames: remove the members already renamed (a companion without its main
    file is worse than neither)."""
    for target in targets:
        with _lock:
            if target not in _half_committed:
                continue
            _half_committed.discard(target)
        target.unlink(missing_ok=True)


def _remove_all_live() -> None:
    with _lock:
        live, half = list(_live), list(_half_committed)
    for tmp in live:
        _remove(tmp)
    _undo_half_commit(half)


def _on_signal(signum, frame) -> None:
    _remove_all_live()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)  # let the signal do what it did before: end the process
    os.kill(os.getpid(), signum)


def _begin() -> None:
    global _active_writes
    with _lock:
        _active_writes += 1
        if _active_writes > 1 or threading.current_thread() is not threading.main_thread():
            return
        for signum in _HANDLED_SIGNALS:
            current = signal.getsignal(signum)
            if current in (signal.SIG_IGN, None) or current is _on_signal:
                continue
            _previous_handlers[signum] = current
            signal.signal(signum, _on_signal)


def _end() -> None:
    global _active_writes
    with _lock:
        _active_writes -= 1
        if _active_writes or threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in _previous_handlers.items():
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, previous)
        _previous_handlers.clear()


def _pid_of(candidate: Path, name: str) -> int | None:
    middle = candidate.name[len(name) + 2:-len(PARTIAL_SUFFIX)]  # ".NAME." + "PID.RANDOM" + ".partial"
    pid, _, _ = middle.partition(".")
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


atexit.register(_remove_all_live)
