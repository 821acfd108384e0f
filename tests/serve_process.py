"""`fuselm serve` as a real subprocess on a free port, for the test_serve_* modules: started with a hard
timeout, killed whatever happens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

START_TIMEOUT = 180  # seconds to load the model and bind
SERVING = re.compile(r"serving (\S+) on (http://\S+)")


class ServerProcess:
    def __init__(self, *args: str, model: str = "demo", timeout: float = START_TIMEOUT, ranks: int = 1):
        self.tag, self.ranks = uuid.uuid4().hex, ranks
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", **{MARKER: self.tag})
        launcher = [sys.executable, "-m", "fuselm"] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "fuselm"]
        self.argv = [*launcher, "serve", model, "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.kill()
            raise RuntimeError(f"fuselm serve did not start in {timeout} s:\n{self.output}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = SERVING.search(line)
            if match and self.url is None:
                self.url = match.group(2)
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and wait for the exit status (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        kill_marked(self.tag)  # torchrun's ranks run in sessions of their own

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.ranks > 1:
            self.stop(signal.SIGTERM)  # torchrun stops its ranks
        self.kill()


MARKER = "FUSELM_TEST_PROCESS"  # in the environment of every process a test starts, to find them all afterwards


def marked(tag: str) -> list[int]:
    """The processes whose environment carries MARKER=tag (a launcher's children included)."""
    needle, found = f"{MARKER}={tag}".encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_marked(tag: str) -> None:
    for pid in marked(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(predicate, timeout: float = 30, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def metric(text: str, name: str) -> float:
    """A sample's value from /metrics (summed over labels), parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
                found = True
    if not found:
        raise KeyError(f"metric {name} not in /metrics")
    return total
