"""The test side of a client process (see driver.py): start it, call its commands."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
DRIVER = HARNESS_DIR / "driver.py"
REPO = HARNESS_DIR.parents[2]
# ../shared beside the repository: read and run by the tests, never by the project itself.
CLIENTS_DIR = REPO.parent / "shared" / "optiverse-client"
VARIANTS = ("upstream", "fork")


class DriverError(AssertionError):
    """A client command failed or timed out (an AssertionError so that it reads as a test
    failure, with the client's own explanation)."""


class Client:
    def __init__(self, name: str, variant: str, log_dir: Path, home: Path):
        if variant not in VARIANTS:
            raise ValueError(f"unknown client variant {variant!r}")
        src = CLIENTS_DIR / variant / "src"
        if not (src / "optiverse").is_dir():
            raise FileNotFoundError(f"client sources missing: {src}")
        self.name = name
        self.variant = variant
        self.log_path = log_dir / f"{name}-{variant}.log"
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            QT_QPA_PLATFORM="offscreen",
            PYTHONPATH=str(src),
            # A home of its own: the app keeps settings (magnetic snap...) and autosaves there.
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local/share"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_RUNTIME_DIR=str(home / "run"),
            # numba cannot cache beside the read-only sources; share one cache between runs.
            NUMBA_CACHE_DIR=str(REPO / "target" / "realclient-numba-cache"),
            PYTHONUNBUFFERED="1",
        )
        (home / "run").mkdir(mode=0o700, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=str(home),
        )
        self._buf = b""
        self._next_id = 0
        self.ready = False

    def wait_ready(self, timeout: float = 60.0) -> None:
        msg = self._read_line(time.monotonic() + timeout, "start")
        if msg.get("event") != "ready":
            raise DriverError(f"{self.name}: unexpected first line {msg}")
        self.ready = True

    def _read_line(self, deadline: float, what: str) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DriverError(f"{self.name} ({self.variant}): no answer to {what} in time; "
                                  f"see {self.log_path}\n{self.log_tail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    code = self.proc.wait(timeout=10)
                    raise DriverError(f"{self.name} ({self.variant}) exited ({code}) during "
                                      f"{what}; see {self.log_path}\n{self.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, cmd: str, timeout: float = 30.0, **args):
        """Run one command in the client; its own waits get `timeout`, the channel a bit more."""
        self._next_id += 1
        req = {"id": self._next_id, "cmd": cmd, **args}
        if cmd in ("barrier", "wait_acked", "wait_disconnected", "wait_log", "wait_status"):
            req["timeout"] = timeout
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        resp = self._read_line(time.monotonic() + timeout + 30, f"{cmd}")
        if resp.get("id") != self._next_id:
            raise DriverError(f"{self.name}: answer {resp} does not match request {req}")
        if not resp["ok"]:
            raise DriverError(f"{self.name} ({self.variant}) {cmd} {args}: {resp['error']}")
        return resp["result"]

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # Conveniences named after what the user does.
    def host(self, port: int, session: str, user: str, timeout: float = 20.0) -> None:
        before = self.call("host", port=port, session=session, user=user)
        self.call("wait_acked", after_conn=before, timeout=timeout)

    def join(self, url: str, session: str, user: str, timeout: float = 20.0) -> None:
        before = self.call("join", url=url, session=session, user=user)
        self.call("wait_acked", after_conn=before, timeout=timeout)

    def barrier(self, timeout: float = 30.0) -> None:
        self.call("barrier", timeout=timeout)

    def add(self, kind: str, x: float, y: float) -> str:
        return self.call("add", kind=kind, x=x, y=y)

    def move(self, uuid: str, x=None, y=None, angle=None) -> dict:
        return self.call("move", uuid=uuid, x=x, y=y, angle=angle)

    def delete(self, uuid: str) -> None:
        self.call("delete", uuid=uuid)

    def state(self) -> dict:
        return self.call("state")

    def close(self, timeout: float = 5.0) -> None:
        """Quit through the window's close; kill a client that is still busy (one flooded
        with frames may take minutes to drain them, and nothing it does now is checked)."""
        if self.proc.poll() is None:
            try:
                if self.ready:
                    self.proc.stdin.write(b'{"id": 0, "cmd": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
