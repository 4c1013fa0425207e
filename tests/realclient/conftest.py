"""Fixtures: a server (or, in comparison mode, a client variant's relay) and real desktop
clients, each test with its own of both; logs under target/realclient-logs/<test-id>/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from harness.backends import BACKENDS, SERVER_BIN
from harness.client import CLIENTS_DIR, REPO, VARIANTS, Client
from harness.scene import FIXTURES, diff_items, document_as_items, window_items

LOG_ROOT = REPO / "target" / "realclient-logs"


def pytest_addoption(parser):
    parser.addoption(
        "--backends", default="server",
        help="comma-separated, from: " + ", ".join(BACKENDS) + " (default: server)")
    parser.addoption(
        "--results-json", default=None,
        help="append one JSON line per test (outcome, first failed assertion) to this file")


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        names = [n.strip() for n in metafunc.config.getoption("--backends").split(",") if n]
        unknown = [n for n in names if n not in BACKENDS]
        if unknown:
            raise pytest.UsageError(f"unknown backend(s) {unknown}; known: {list(BACKENDS)}")
        metafunc.parametrize("backend_name", names)


@pytest.fixture(scope="session", autouse=True)
def prerequisites(request):
    """Fail (never skip) when what the tests run is missing."""
    missing = [str(p) for p in (CLIENTS_DIR / v / "src" / "optiverse" for v in VARIANTS)
               if not p.is_dir()]
    if not FIXTURES.is_dir():
        missing.append(str(FIXTURES))
    backends = request.config.getoption("--backends")
    if "server" in backends and not SERVER_BIN.exists():
        missing.append(f"{SERVER_BIN} (cargo build --release --bin optiverse-collab)")
    if missing:
        pytest.fail("missing prerequisites: " + ", ".join(missing), pytrace=False)


def _test_dir_name(nodeid: str) -> str:
    name = nodeid.split("::", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


@pytest.fixture
def log_dir(request) -> Path:
    path = LOG_ROOT / _test_dir_name(request.node.nodeid)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class World:
    """One test's server and clients, with the waits and checks every scenario uses."""

    def __init__(self, backend_name: str, log_dir: Path, tmp: Path):
        factory, self.magnetic_snap = BACKENDS[backend_name]
        self.backend_name = backend_name
        self.backend = factory(log_dir, tmp / "data")
        self.log_dir = log_dir
        self.tmp = tmp
        self.clients: list[Client] = []
        self.session = "bench-" + tmp.name.replace("_", "-")[-24:]

    def start_backend(self) -> None:
        self.backend.start()

    def start_clients(self, *specs: tuple[str, str]) -> list[Client]:
        """Start one process per (name, variant) at once, then wait until all are up."""
        started = [Client(name, variant, self.log_dir, self.tmp / f"home-{name}")
                   for name, variant in specs]
        self.clients.extend(started)
        for c in started:
            c.wait_ready()
            c.call("set_magnetic_snap", on=self.magnetic_snap)
        return started

    def host(self, client: Client) -> None:
        client.host(self.backend.port, self.session, client.name)

    def join(self, client: Client) -> None:
        client.join(self.backend.url, self.session, client.name)

    def quiesce(self, clients: list[Client], timeout: float = 30.0) -> None:
        """Barrier on each client in turn, twice: the second round covers what the clients
        sent in reaction to the first (a host's upload on user:joined, corrections...)."""
        for _ in range(2):
            for c in clients:
                c.barrier(timeout=timeout)

    def window(self, client: Client) -> dict[str, dict]:
        return window_items(client.state(), f"{client.name} ({client.variant})")

    def assert_windows_equal_document(self, clients: list[Client],
                                      when: str = "final") -> dict[str, dict]:
        """Every window shows exactly the server's document (compared fields, exact floats).
        Windows are read first: reading a relay's state is seen by the clients."""
        windows = {f"{c.name} ({c.variant})": self.window(c) for c in clients}
        doc = document_as_items(self.backend.document(self.session))
        self.dump(when, {"document": doc, "windows": windows})
        problems = []
        for who, items in windows.items():
            problems += [f"{who}: {p}" for p in diff_items(
                doc, items, expected_name="the server", actual_name="window")]
        assert not problems, f"windows differ from the server's document ({when}):\n  " + \
            "\n  ".join(problems)
        return doc

    def dump(self, label: str, data) -> None:
        """Keep what a check compared, beside the logs."""
        path = self.log_dir / f"{label}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True, default=repr))

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.backend.stop()


@pytest.fixture
def world(backend_name, log_dir, tmp_path):
    w = World(backend_name, log_dir, tmp_path)
    try:
        w.start_backend()
        yield w
    finally:
        w.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = item.config.getoption("--results-json")
    if not path or not (report.when == "call" or report.failed):
        return
    message = ""
    if report.failed:
        message = _first_line_of_failure(call.excinfo) if call.excinfo else "failed"
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({
            "scenario": item.originalname,
            "pair": params.get("pair"),
            "backend": params.get("backend_name"),
            "phase": report.when,
            "outcome": report.outcome,
            "message": message,
            "seconds": round(report.duration, 1),
        }) + "\n")


def _first_line_of_failure(excinfo) -> str:
    text = str(excinfo.value).strip() or excinfo.typename
    # Keep the message; drop pytest's re-statement of the assert expression.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("assert ", "+", "where "))]
    return " / ".join(lines[:4])[:600]
