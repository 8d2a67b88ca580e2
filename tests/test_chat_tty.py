"""``preftune chat`` at a real terminal (a pseudo-terminal): arrow keys edit the line and recall
earlier ones instead of reaching the model as escape codes, and the history outlives the session."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import preftune

LEFT, UP, HOME, EOF = "\x1b[D", "\x1b[A", "\x01", "\x04"
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")]


class Terminal:
    """``preftune chat MODEL`` on a pseudo-terminal: type keys, wait for text on the screen."""

    def __init__(self, model: Path, cache: Path):
        env = {**os.environ, "PYTHONPATH": str(Path(preftune.__file__).parents[1]), "HF_HUB_OFFLINE": "1",
               "PREFTUNE_CACHE": str(cache), "TERM": "xterm", "OMP_NUM_THREADS": "1"}
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "chat", str(model), "--max-new-tokens",
                                      "3"], stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        self.screen = ""

    def wait_for(self, text: str, count: int = 1, timeout: float = 180.0) -> None:
        self.wait_until(lambda screen: screen.count(text) >= count, f"{text!r} x{count}", timeout)

    def wait_until(self, done, what: str, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while not done(self.screen):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"{what} never appeared; the screen:\n{self.screen}")
            try:
                self.screen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:  # the chat has exited
                raise AssertionError(f"the chat ended before {what}; the screen:\n{self.screen}") from None

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def close(self) -> int:
        # ^D only ends the chat once readline holds the terminal, which it does before it shows the
        # prompt: typed earlier, the terminal's line discipline swallows it and the chat waits on.
        self.wait_until(lambda screen: "you> " in screen.rsplit("\n", 1)[-1], "the prompt on the last line")
        self.type(EOF)
        try:
            return self.proc.wait(timeout=180)  # a loaded machine exits slowly
        finally:
            os.close(self.fd)


def _users(path: Path) -> list[str]:
    return [m["content"] for m in json.loads(path.read_text()) if m["role"] == "user"]


def test_chat_edits_lines_and_keeps_history(tiny_model_dir, tmp_path):
    chat = Terminal(tiny_model_dir, tmp_path / "cache")
    try:
        chat.wait_for("you> ")
        chat.type(f"helo{LEFT}l\r")  # a typo fixed with the left arrow
        chat.wait_for("assistant> ")
        chat.type(f"{UP}{HOME}say \r")  # the last line recalled, then edited at its start
        chat.wait_for("assistant> ", 2)
        chat.type(f"/save {tmp_path / 'one.json'}\r")
        chat.wait_for("(saved 4 messages")
    finally:
        assert chat.close() == 0
    assert _users(tmp_path / "one.json") == ["hello", "say hello"]
    assert "\\x1b" not in (tmp_path / "one.json").read_text()

    again = Terminal(tiny_model_dir, tmp_path / "cache")  # a new session recalls the last one's lines
    try:
        again.wait_for("you> ")
        again.type(f"{UP}{UP}\r")  # past '/save ...' to 'say hello'
        again.wait_for("assistant> ")
        again.type(f"/save {tmp_path / 'two.json'}\r")
        again.wait_for("(saved 2 messages")
    finally:
        assert again.close() == 0
    assert _users(tmp_path / "two.json") == ["say hello"]
    assert (tmp_path / "cache" / "chat_history").read_text().splitlines()[:2] == ["hello", "say hello"]
