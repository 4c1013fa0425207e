"""Real Optiverse desktop clients (both variants, unchanged) against the server.

Each scenario runs for every host/joiner variant pair; a late joiner is of the joiner's
variant. Magnetic snap is off (the `server-snap` backend of the comparison mode turns it on).
Assertions are on what each window shows and on the server's document, compared on the fields
both variants serialise (harness/scene.py), floats bit for bit. Rulers and text notes are left
out: both variants break them when they arrive remotely (client defect, not the server's).
"""

from __future__ import annotations

import json

import pytest

from harness.backends import CollabServer
from harness.client import DriverError
from harness.scene import FIXTURES, bench_file, diff_items, document_as_items

PAIRS = ["upstream/upstream", "fork/fork", "upstream/fork", "fork/upstream"]


def variants(pair: str) -> tuple[str, str]:
    host, joiner = pair.split("/")
    return host, joiner


def step(client, uuid: str, **where) -> None:
    """One drag step of `client` on its item `uuid` (x, y and/or angle)."""
    try:
        client.move(uuid, **where)
    except DriverError as e:
        if "is not in the window" not in str(e):
            raise
        raise AssertionError(f"{client.name} ({client.variant}): item {uuid[:8]} is gone from "
                             f"its window (removed, or never received) as it drags it") from e


def drag(client, uuid: str, start: tuple[float, float], step_by: tuple[float, float],
         steps: int, turn: float | None = None):
    """A mouse drag: `steps` positions, each one setPos (and, with `turn`, one setRotation to
    `turn` degrees more than the step before)."""
    for i in range(1, steps + 1):
        step(client, uuid, x=start[0] + step_by[0] * i, y=start[1] + step_by[1] * i,
             angle=None if turn is None else turn * i)


def assert_window_holds(world, client, expected: set[str], what: str) -> None:
    shown = set(world.window(client))
    missing, extra = expected - shown, shown - expected
    assert not missing and not extra, (
        f"{client.name} ({client.variant})'s window should show exactly {what}: missing "
        f"{sorted(u[:8] for u in missing)}, unexpected {sorted(u[:8] for u in extra)}")


def assert_kept(before: dict, window: dict, who: str) -> None:
    """Everything in `before` is still in `window`, unchanged (the window may hold more)."""
    problems = diff_items(before, {u: window[u] for u in before if u in window},
                          expected_name="its own earlier state", actual_name="now")
    assert not problems, f"{who} lost its own work:\n  " + "\n  ".join(problems)


def assert_document_holds(world, expected: set[str], what: str) -> dict:
    doc = world.backend.document(world.session) or {}
    missing, extra = expected - set(doc), set(doc) - expected
    assert not missing and not extra, (
        f"the server's document should hold exactly {what}: "
        f"missing {sorted(u[:8] for u in missing)}, unexpected {sorted(u[:8] for u in extra)}")
    return doc


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", PAIRS)
def test_a_host_edits_alone_then_colleague_joins(world, pair):
    hv, jv = variants(pair)
    host, colleague = world.start_clients(("host", hv), ("colleague", jv))
    canvas = [host.add("lens", 12.3, 45.6), host.add("mirror", 150.25, -30.5),
              host.add("source", -80.75, 10.125)]
    world.host(host)
    host.barrier()
    drag(host, canvas[0], start=(12.3, 45.6), step_by=(7.7, -3.3), steps=6, turn=10.1)
    added = host.add("beamsplitter", 90.3, 60.7)
    host.barrier()
    host_work = world.window(host)
    assert set(host_work) == {*canvas, added}

    world.join(colleague)
    world.quiesce([host, colleague])
    theirs = colleague.add("lens", -20.2, 110.9)
    world.quiesce([host, colleague])

    assert_kept(host_work, world.window(host), "the host")
    if world.backend.has_document_api:
        assert_document_holds(world, {*host_work, theirs}, "the host's items and the colleague's")
    world.assert_windows_equal_document([host, colleague])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", PAIRS)
def test_b_colleague_connects_first(world, pair):
    hv, jv = variants(pair)
    host, colleague = world.start_clients(("host", hv), ("colleague", jv))
    world.join(colleague)
    colleague.barrier()

    canvas = [host.add("lens", 33.1, -12.7), host.add("beamsplitter", 101.9, 0.3),
              host.add("source", -55.5, 7.25)]
    world.host(host)
    world.quiesce([colleague, host])
    drag(host, canvas[1], start=(101.9, 0.3), step_by=(-4.1, 9.9), steps=6)
    world.quiesce([colleague, host])
    host_work = world.window(host)
    assert set(host_work) == set(canvas)

    theirs = colleague.add("mirror", 70.7, 140.3)
    world.quiesce([colleague, host])

    assert_kept(host_work, world.window(host), "the host")
    if world.backend.has_document_api:
        assert_document_holds(world, {*host_work, theirs}, "the host's items and the colleague's")
    world.assert_windows_equal_document([host, colleague])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pair", PAIRS)
def test_c_concurrent_edits_then_late_joiner(world, pair):
    hv, jv = variants(pair)
    host, colleague, late = world.start_clients(("host", hv), ("colleague", jv), ("late", jv))
    a, b, c = (host.add("lens", 0.5, 0.25), host.add("mirror", 80.8, 40.4),
               host.add("source", -60.6, -20.2))
    world.host(host)
    world.join(colleague)
    world.quiesce([host, colleague])

    h1 = host.add("beamsplitter", 120.12, -70.07)
    j1 = colleague.add("mirror", -140.14, 90.09)
    world.quiesce([host, colleague])

    # Both drag and turn `a` at once, steps interleaved with no barrier in between (turns
    # received live must not come out mirrored on upstream); the host also drags `b`, which
    # the colleague then removes, while the host removes the colleague's `j1`.
    for i in range(1, 7):
        step(host, a, x=0.5 + 3.3 * i, y=0.25 + 1.1 * i, angle=7.5 * i)
        step(colleague, a, x=0.5 - 2.2 * i, y=0.25 - 4.4 * i, angle=-11.25 * i)
    drag(host, b, start=(80.8, 40.4), step_by=(1.5, 2.5), steps=3)
    world.quiesce([host, colleague])
    colleague.delete(b)
    host.delete(j1)
    world.quiesce([host, colleague])

    world.join(late)
    world.quiesce([host, colleague, late])

    expected = {a, c, h1}  # b and j1 removed
    assert_window_holds(world, host, expected, "a, c and h1 (b and j1 removed)")
    if world.backend.has_document_api:
        assert_document_holds(world, expected, "a, c and h1 (b and j1 removed)")
    world.assert_windows_equal_document([host, colleague, late])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pair", PAIRS)
def test_d_host_reconnects_with_300_items(world, pair):
    hv, jv = variants(pair)
    host, colleague = world.start_clients(("host", hv), ("colleague", jv))
    # Auto-trace off (View menu): with it, each client re-traces ~100 sources per received item
    # or command (0.4 s each in the fork), which would time ray tracing, not collaboration.
    for client in (host, colleague):
        client.call("set_autotrace", on=False)
    bench = bench_file(world.tmp / "bench.scene.json", 300)
    assert host.call("open_file", path=str(bench)) == 300
    canvas = world.window(host)
    world.host(host)
    host.barrier(timeout=90)
    world.join(colleague)
    world.quiesce([host, colleague], timeout=90)
    assert_kept(canvas, world.window(host), "the host")
    colleague_before = world.window(colleague)

    host.call("disconnect")
    host.call("wait_disconnected", count=1, timeout=20)
    mark = host.call("frame_count")
    world.host(host)
    # Settling takes a correct server a second or two; a host flooded with one frame per item
    # (the fork takes ~0.4 s for each) would take minutes: the frame count says why.
    try:
        world.quiesce([host, colleague], timeout=20)
    finally:
        frames = [f for f in host.call("frames", since=mark) if f["type"] != "pong"]
        summary = [f"{f['type']}:{f['action']}" if f["action"] else f["type"] for f in frames]
        assert len(frames) <= 5, (
            f"the reconnecting host received {len(frames)} frames besides pong so far "
            f"(at most 5 expected): {summary[:6]}{' ...' if len(summary) > 6 else ''}")
    assert_kept(colleague_before, world.window(colleague), "the colleague's window (undisturbed)")
    assert_kept(canvas, world.window(host), "the host")
    if jv == "upstream":
        # Past 100 items a full state is not followed by the placeholder fix (it would cost the
        # fork a ray trace per item: README "Choices"), so an upstream joiner shows the
        # bench's items on its default placeholders: the documented client defect.
        world.assert_windows_equal_document([host])
        assert_window_holds(world, colleague, set(canvas), "every item of the bench")
    else:
        world.assert_windows_equal_document([host, colleague])


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pair", PAIRS)
def test_e_server_restart_then_both_reconnect(world, pair):
    hv, jv = variants(pair)
    host, colleague = world.start_clients(("host", hv), ("colleague", jv))
    canvas = [host.add("lens", 5.55, 6.66), host.add("mirror", -7.77, 88.8),
              host.add("source", 99.9, -1.01)]
    world.host(host)
    world.join(colleague)
    world.quiesce([host, colleague])
    drag(host, canvas[2], start=(99.9, -1.01), step_by=(2.02, 3.03), steps=5)
    theirs = colleague.add("beamsplitter", 44.4, -44.4)
    world.quiesce([host, colleague])
    if world.backend.has_document_api:  # a relay's state can only be read at the very end
        world.assert_windows_equal_document([host, colleague], when="before the restart")
    before = world.window(host)
    assert set(before) == {*canvas, theirs}

    world.backend.restart()  # SIGTERM, then the same port and data dir
    host.call("wait_disconnected", count=1, timeout=20)
    colleague.call("wait_disconnected", count=1, timeout=20)
    world.host(host)
    world.join(colleague)
    world.quiesce([host, colleague])

    if world.backend.has_document_api:
        doc = document_as_items(world.backend.document(world.session))
        lost = diff_items(before, doc, expected_name="before the restart",
                          actual_name="the server")
        assert not lost, "the restart lost work:\n  " + "\n  ".join(lost)
    assert_kept(before, world.window(host), "the host")
    world.assert_windows_equal_document([host, colleague])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", PAIRS)
def test_f_disconnect_is_clean(world, pair):
    hv, jv = variants(pair)
    host, colleague = world.start_clients(("host", hv), ("colleague", jv))
    host.add("lens", 1.0, 2.0)
    host.add("source", -3.0, 4.0)
    world.host(host)
    world.join(colleague)
    world.quiesce([host, colleague])

    for leaving, staying in ((colleague, host), (host, None)):
        mark = leaving.call("log_count")
        staying_mark = staying.call("log_count") if staying is not None else 0
        leaving.call("disconnect")
        leaving.call("wait_disconnected", count=1, timeout=20)
        complaints = [f"{e['level']}: {e['message']}" for e in leaving.call("log", since=mark)
                      if e["category"] == "Collaboration" and e["level"] in ("WARNING", "ERROR")]
        assert not complaints, (
            f"{leaving.name} ({leaving.variant}) logged on Disconnect: " + " / ".join(complaints))
        if staying is not None:
            # The client's own log line for a user:left frame.
            staying.call("wait_log", message=f"User left: {leaving.name}", since=staying_mark,
                         timeout=20)
    for client in (host, colleague):
        errors = [s for s in client.call("status") if "Error" in s]
        assert not errors, f"{client.name} ({client.variant}) status bar showed: {errors}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", PAIRS)
def test_g_a_yjs_client_moves_and_turns_an_item(world, pair):
    if not world.backend.has_document_api:
        pytest.skip("a relay has no Yjs endpoint")
    hv, jv = variants(pair)
    host, colleague = world.start_clients(("host", hv), ("colleague", jv))
    lens, source = host.add("lens", 10.5, 20.25), host.add("source", -30.5, 40.75)
    world.host(host)
    world.join(colleague)
    world.quiesce([host, colleague])

    def turn(items):
        items[lens]["x_mm"] = 61.125
        items[lens]["angle_deg"] = 33.75
        items[source]["y_mm"] = -12.5

    # A position and angle change from Yjs reaches desktop clients as update_item (upstream
    # mirrors the angle of a move_item).
    world.backend.yjs_edit(world.session, turn)
    world.quiesce([host, colleague])
    doc = world.assert_windows_equal_document([host, colleague])
    assert (doc[lens]["data"]["x_mm"], doc[lens]["data"]["angle_deg"]) == (61.125, 33.75)
    assert doc[source]["data"]["y_mm"] == -12.5


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pair", PAIRS)
def test_h_clients_join_through_token_urls_and_a_view_token_changes_nothing(world, pair):
    if not isinstance(world.backend, CollabServer):
        pytest.skip("a relay has no access control")
    hv, jv = variants(pair)
    world.backend.require_tokens(world.tmp / "auth.key")
    first, second, viewer = world.start_clients(("first", hv), ("second", jv), ("viewer", jv))
    # A teacher's bench (one fixture item), uploaded as a desktop host does: a desktop client
    # that connects adds nothing before the session has a scene.
    seed = json.loads(sorted(FIXTURES.glob("*.scene.json"))[0].read_text())["items"][0]
    # As the app itself serialises it (the fixture file is older): windows are compared with
    # the document exactly.
    seed["color_hex"] = seed["color_hex"].lower()
    seed["locked"] = False
    s = world.session
    world.backend.seed(s, [seed], world.backend.token(s, "edit", "teacher")["token"])

    # Each student types the server URL the `token` command printed (ws://.../t/TOKEN); the
    # app appends /ws/{session}/{user}.
    for client in (first, second):
        client.join(world.backend.token(s, "edit", client.name)["desktop"], s, client.name)
    world.quiesce([first, second])
    mine = first.add("lens", 12.5, 30.25)
    theirs = second.add("mirror", -40.5, 60.75)
    world.quiesce([first, second])
    drag(first, theirs, start=(-40.5, 60.75), step_by=(3.5, -1.25), steps=4)
    world.quiesce([first, second])
    expected = {seed["item_uuid"], mine, theirs}
    assert_document_holds(world, expected, "the teacher's item and both students'")
    world.assert_windows_equal_document([first, second])

    # Without a valid token the upgrade is refused (401): the app's status bar shows an error
    # (Qt's words for a 401: "Unsupported WWW-Authenticate challenges encountered").
    mark = len(viewer.call("status"))
    viewer.call("join", url=f"{world.backend.url}/t/not-a-token", session=s, user=viewer.name)
    viewer.call("wait_status", contains="Error: ", since=mark, timeout=20)

    # A view token: the client follows the bench, its own edits are refused (`forbidden`).
    viewer.join(world.backend.token(s, "view")["desktop"], s, viewer.name)
    world.quiesce([first, second, viewer])
    mark = viewer.call("frame_count")
    refused = viewer.add("source", 5.5, -7.25)
    world.quiesce([first, second, viewer])
    codes = [f["code"] for f in viewer.call("frames", since=mark) if f["type"] == "error"]
    assert codes and set(codes) == {"forbidden"}, f"the viewer was told: {codes}"
    assert_document_holds(world, expected, "the same items (the viewer's add refused)")
    world.assert_windows_equal_document([first, second])
    assert_window_holds(world, viewer, {*expected, refused},
                        "the bench, and its own refused add (a client rolls nothing back)")
