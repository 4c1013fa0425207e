"""What the clients connect to: this project's server, or (comparison mode) the Python relay a
client variant shipped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .client import CLIENTS_DIR, REPO

SERVER_BIN = REPO / "target" / "release" / "optiverse-collab"


class BackendError(AssertionError):
    pass


def _wait_for_line(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern, what: str,
                   timeout: float = 30.0) -> re.Match:
    """Follow the process's log file until `pattern` appears (it writes nothing else we need)."""
    deadline = time.monotonic() + timeout
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = ""
        while True:
            chunk = f.read()
            if chunk:
                text += chunk
                m = pattern.search(text)
                if m:
                    return m
            if proc.poll() is not None:
                raise BackendError(f"{what} exited ({proc.returncode}) before it was ready:\n"
                                   + text[-3000:])
            if time.monotonic() > deadline:
                raise BackendError(f"{what} not ready after {timeout} s:\n" + text[-3000:])
            # The log file cannot be waited on; the process's exit can, with a short bound.
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """One running server the clients of a test share."""

    name = "?"
    # Whether the backend keeps a document a test can read exactly (our server's HTTP API).
    has_document_api = False

    def __init__(self, log_dir: Path, data_dir: Path):
        self.log_dir = log_dir
        self.data_dir = data_dir
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _log_path(self) -> Path:
        self.starts += 1
        suffix = "" if self.starts == 1 else f"-{self.starts}"
        return self.log_dir / f"{self.name}{suffix}.log"

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, and wait for the exit (SIGKILL past the deadline)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise BackendError(f"{self.name} did not exit within {timeout} s of SIGTERM")

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start(self.port)

    def document(self, session: str) -> dict[str, dict] | None:
        """The session's items as the server holds them, {uuid: item}."""
        raise NotImplementedError


class CollabServer(Backend):
    """target/release/optiverse-collab, a fresh data dir per test."""

    name = "server"
    has_document_api = True

    def __init__(self, log_dir: Path, data_dir: Path):
        super().__init__(log_dir, data_dir)
        # With a key (require_tokens), every endpoint but /health needs a token.
        self.key_file: Path | None = None
        self._admin: str | None = None

    def require_tokens(self, key_file: Path) -> None:
        """Restarts the server with a signing key (README, "Securing a server")."""
        key_file.write_text(secrets.token_urlsafe(48) + "\n")
        self.key_file = key_file
        self.restart()

    def token(self, session: str, role: str, user: str | None = None) -> dict[str, str]:
        """Mints a token with `optiverse-collab token`, as a lab's admin would, and returns
        what it printed: `token`, `desktop` (the server URL to type into the app), `browser`."""
        args = [str(SERVER_BIN), "token", "--auth-key-file", str(self.key_file),
                "--session", session, "--role", role, "--url", f"http://127.0.0.1:{self.port}"]
        if user is not None:
            args += ["--user", user]
        lines = subprocess.run(args, check=True, capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
        after = {label: lines[i + 1].strip() for i, label in enumerate(lines[:-1])}
        return {"token": lines[1].strip(), "desktop": after["Desktop app, server URL:"],
                "browser": after["Browser:"]}

    def _headers(self) -> dict[str, str]:
        if self.key_file is None:
            return {}
        if self._admin is None:
            self._admin = self.token("*", "admin")["token"]
        return {"Authorization": f"Bearer {self._admin}"}

    def seed(self, session: str, items: list[dict], token: str) -> None:
        """Uploads `items` as a desktop host does (`sync:full_state` on `/ws`), through the
        `/t/{token}` prefix, and waits until the server applied it (`pong`)."""
        asyncio.run(self._seed(session, items, token))

    async def _seed(self, session: str, items: list[dict], token: str) -> None:
        from websockets.asyncio.client import connect

        uri = f"{self.url}/t/{token}/ws/{urllib.parse.quote(session, safe='')}/teacher"
        async with connect(uri, ping_interval=None) as ws:
            while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") \
                    != "connection:ack":
                pass
            await ws.send(json.dumps({
                "type": "sync:full_state", "user_id": "teacher",
                "state": {"items": items, "version": 1,
                          "timestamp": "2026-12-01T10:00:00.000Z"}}))
            await ws.send(json.dumps({"type": "ping"}))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg.get("type") == "error":
                    raise BackendError(f"the seed upload was refused: {msg}")
                if msg.get("type") == "pong":
                    return

    def start(self, port: int = 0) -> None:
        if not SERVER_BIN.exists():
            raise BackendError(f"{SERVER_BIN} is missing: run tests/realclient/run.sh, which "
                               "builds it (cargo build --release --bin optiverse-collab)")
        log_path = self._log_path()
        log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [str(SERVER_BIN), "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(self.data_dir), "--log-level", "info"]
            + (["--auth-key-file", str(self.key_file)] if self.key_file else []),
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        m = _wait_for_line(self.proc, log_path, re.compile(r"listening addr=[^\s:]+:(\d+)"),
                           "optiverse-collab")
        self.port = int(m.group(1))

    def document(self, session: str) -> dict[str, dict] | None:
        url = (f"http://127.0.0.1:{self.port}/api/sessions/"
               f"{urllib.parse.quote(session, safe='')}/scene")
        try:
            request = urllib.request.Request(url, headers=self._headers())
            with urllib.request.urlopen(request, timeout=20) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None  # never stored
            raise
        items = body["items"]
        by_uuid = {}
        for item in items:
            if item["uuid"] in by_uuid:
                raise BackendError(f"the server's scene lists {item['uuid']} twice")
            by_uuid[item["uuid"]] = item
        return by_uuid


    def yjs_edit(self, session: str, edit) -> None:
        """Edits the session as a Yjs client would (pycrdt): reads the whole document
        (`GET .../update`), lets `edit(items)` change the `items` map in one transaction, and
        posts the resulting update (`POST .../update`)."""
        from pycrdt import Doc, Map

        url = (f"http://127.0.0.1:{self.port}/api/sessions/"
               f"{urllib.parse.quote(session, safe='')}/update")
        with urllib.request.urlopen(url, timeout=20) as resp:
            doc = Doc()
            doc.apply_update(resp.read())
        before = doc.get_state()
        items = doc.get("items", type=Map)
        with doc.transaction():
            edit(items)
        request = urllib.request.Request(url, data=doc.get_update(before), method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=20) as resp:
            if resp.status != 200:
                raise BackendError(f"POST {url}: {resp.status} {resp.read()!r}")


class Relay(Backend):
    """reference_collaboration_server.py of one client variant (keeps nothing on disk)."""

    has_document_api = False

    def __init__(self, variant: str, log_dir: Path, data_dir: Path):
        super().__init__(log_dir, data_dir)
        self.variant = variant
        self.name = f"relay-{variant}"
        self.script = CLIENTS_DIR / variant / "reference_collaboration_server.py"

    def start(self, port: int = 0) -> None:
        if not self.script.exists():
            raise BackendError(f"{self.script} is missing")
        port = port or _free_port()
        log_path = self._log_path()
        log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        _wait_for_line(self.proc, log_path, re.compile(r"Server ready"), self.name)
        self.port = port

    def document(self, session: str) -> dict[str, dict] | None:
        """A relay has no API: what it would give a newcomer is its document. Connects as an
        extra user (which the others see join), so a test reads it only at its very end."""
        return asyncio.run(self._read_state(session))

    async def _read_state(self, session: str):
        from websockets.asyncio.client import connect

        uri = f"{self.url}/ws/{session}/harness-observer"
        async with connect(uri, ping_interval=None) as ws:
            ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if ack.get("type") != "connection:ack":
                raise BackendError(f"{self.name}: first frame {ack}")
            await ws.send(json.dumps({"type": "sync:request", "user_id": "harness-observer"}))
            # The state sent on join precedes user:joined to the others, hence any reaction.
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg.get("type") == "sync:full_state":
                    break
        items = (msg.get("state") or {}).get("items", [])
        return {i.get("uuid") or i.get("item_uuid"): i for i in items}


BACKENDS = {
    # name: (factory, magnetic snap on in the clients)
    "server": (lambda log_dir, data_dir: CollabServer(log_dir, data_dir), False),
    "server-snap": (lambda log_dir, data_dir: CollabServer(log_dir, data_dir), True),
    "relay-upstream": (lambda log_dir, data_dir: Relay("upstream", log_dir, data_dir), False),
    "relay-fork": (lambda log_dir, data_dir: Relay("fork", log_dir, data_dir), False),
}
