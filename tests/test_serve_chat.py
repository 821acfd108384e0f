"""`fuselm chat demo` in a real terminal (a pty): /help, answers equal to the library's, a drawn picture saved
with its path printed (the same picture fuselm.generate draws), /image PATH as input, Ctrl-C stopping an answer
and returning to the prompt, /reset, Ctrl-D leaving with status 0."""

import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import torch
from PIL import Image

import fuselm
from fuselm.demo.world import render, sample_scenes
from fuselm.generation.stream import ImageDone, TextDelta

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    def __init__(self, argv: list[str], cwd: str):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TERM="dumb", PYTHONUNBUFFERED="1")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C becomes SIGINT
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Read until `pattern` (a regex) appears in the output after what was already matched."""
        end = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.seen)
            if match:
                before, self.seen = self.seen[:match.end()], self.seen[match.end():]
                return before
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got {self.seen[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    raise AssertionError(f"the chat ended while waiting for {pattern!r}: {self.seen!r}") from None
                self.seen += ANSI.sub("", data)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 65536)
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError("the chat did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return fuselm.load("demo")


def test_chat_in_a_terminal(tmp_path, model):
    scene_path = tmp_path / "scene.png"
    render(sample_scenes(1, seed=5)[0]).save(scene_path)
    term = Terminal([sys.executable, "-m", "fuselm", "chat", "demo", "--threads", "1", "--temperature", "0"],
                    str(tmp_path))
    try:
        term.expect(r"> ")
        term.send("/help\n")
        assert "/image PATH" in term.expect(r"\n> ")

        ask = [{"role": "user", "content": "draw a red circle"}]
        expected = "".join(e.text for e in fuselm.generate(model, ask, images="on", max_tokens=256, temperature=0,
                                                           seed=0) if isinstance(e, TextDelta))
        term.send("draw a red circle\n")
        shown = re.sub(r"\[image \d+\]", "", term.expect(r"\n> "))  # the picture markers between the texts
        assert expected and expected in shown

        term.send("/reset\n")
        term.expect(r"\[conversation reset\]")
        ask = [{"role": "user", "content": "a red circle on the left"}]
        picture = next(e.image for e in fuselm.generate(model, ask, images="on", max_tokens=256, temperature=0,
                                                        seed=0) if isinstance(e, ImageDone))
        term.send("a red circle on the left\n")
        saved = re.search(r"\[picture saved: (\S+)\]", term.expect(r"picture saved: \S+\]")).group(1)
        term.expect(r"\n> ")
        got = Image.open(tmp_path / saved).convert("RGB")
        assert got.tobytes() == picture.convert("RGB").tobytes()

        term.send("/reset\n")
        term.expect(r"\[conversation reset\]")
        term.send("draw a red circle\n")  # text, a picture, text, a picture: stopped at the first words
        term.expect(expected.split()[1])
        term.send("\x03")
        interrupted = term.expect(r"\[stopped\]")
        assert "[image 2]" not in interrupted
        term.expect(r"\n> ")

        term.send(f"/image {scene_path}\n")
        term.expect(r"attached to your next message\]\n> ")
        term.send("what is in the picture?\n")
        answer = term.expect(r"\n> ")
        assert "[error" not in answer and re.search(r"(circle|square|triangle)", answer), answer

        term.send("\x04")  # Ctrl-D leaves
        assert term.wait() == 0
    finally:
        term.kill()
