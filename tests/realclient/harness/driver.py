"""One real Optiverse desktop client, driven by the tests over JSON lines.

Run as its own process (Qt allows one QApplication per process) with QT_QPA_PLATFORM=offscreen
and PYTHONPATH selecting the client variant (`.../optiverse-client/<variant>/src`). It builds the
real `MainWindow` and acts only through the app's own entry points: the Collaboration menu's
dialog path (the modal dialog is answered, see `_answer_collaboration_dialog`), the placement
handler, `setPos`/`setRotation` on items, the window's delete handler, File > Open and the
Disconnect action's slot. It never speaks the protocol itself; it only *observes* the client's
`QWebSocket` (extra slots connected after the app's own) to count frames and to wait for the
`pong` of a heartbeat the client sent.

Channel: one JSON object per line. Requests `{"id": N, "cmd": NAME, ...args}` arrive on stdin;
each gets exactly one response `{"id": N, "ok": true, "result": ...}` or
`{"id": N, "ok": false, "error": TEXT}` on the original stdout. A waiting command (barrier, wait)
answers when its condition holds or its deadline passes, while the Qt event loop keeps running.
Everything the app prints goes to stderr, which is the client's log file.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

# The response channel is the original stdout; anything else written to fd 1 (prints in the
# app, Qt messages) must not corrupt it, so fd 1 becomes stderr from here on.
_CHANNEL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

from PyQt6 import QtCore, QtWidgets  # noqa: E402

_T0 = time.monotonic()


def trace(text: str) -> None:
    """A line in the client's log file (stderr), with seconds since start."""
    sys.stderr.write(f"[{time.monotonic() - _T0:8.3f}] {text}\n")
    sys.stderr.flush()


def _jsonable(value):
    """to_dict() may hold numpy scalars or tuples; make them plain JSON values."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


class CommandError(Exception):
    pass


class Driver(QtCore.QObject):
    line_received = QtCore.pyqtSignal(str)

    def __init__(self, app: QtWidgets.QApplication):
        super().__init__()
        self.app = app
        self._guard_modal_dialogs()

        from optiverse.services.log_service import get_log_service
        from optiverse.ui.views.main_window import MainWindow

        self.w = MainWindow()
        self.w.show()
        self.manager = self.w.collaboration_manager
        self.service = self.manager.collaboration_service
        self.ws = self.service.ws

        # What the tests read back.
        self.log: list[dict] = []
        self.status: list[str] = []
        self.frames: list[dict] = []
        self.dialogs: list[str] = []
        self.conn = 0  # connections opened so far; frames are tagged with it
        self.acked = False  # connection:ack seen on the current connection
        self.disconnects: list[dict] = []
        self.pings_sent = 0  # on the current connection (ours and the heartbeat timer's)
        self.pongs_received = 0
        self._waiters: list[tuple] = []  # (request id, predicate, deadline, description)

        get_log_service().add_listener(self._on_log)
        self.w.collab_controller.statusChanged.connect(self._on_status)
        self.w.statusBar().messageChanged.connect(self._on_status)
        # Observers only, connected after the app's own slots: when one of these runs for a
        # frame, the app has already handled it.
        self.ws.connected.connect(self._on_ws_connected)
        self.ws.disconnected.connect(self._on_ws_disconnected)
        self.ws.textMessageReceived.connect(self._on_frame)
        self.service.heartbeat_timer.timeout.connect(self._on_heartbeat_tick)

        self._deadline_timer = QtCore.QTimer(self)
        self._deadline_timer.setInterval(50)
        self._deadline_timer.timeout.connect(self._check_waiters)

        self.line_received.connect(self._on_line)

    # ----- observers -------------------------------------------------------------------------

    def _on_log(self, msg) -> None:
        entry = {"level": msg.level.value, "category": msg.category, "message": msg.message}
        self.log.append(entry)
        trace(f"log {entry['level']:7s} {entry['category']}: {entry['message'][:2000]}")

    def _on_status(self, text: str) -> None:
        if text:
            self.status.append(text)
            trace(f"status: {text}")
            self._check_waiters()

    def _on_ws_connected(self) -> None:
        self.conn += 1
        self.acked = False
        self.pings_sent = 0
        self.pongs_received = 0
        trace(f"ws connected (connection {self.conn})")
        self._check_waiters()

    def _on_ws_disconnected(self) -> None:
        code = self.ws.closeCode()
        code = int(getattr(code, "value", code))
        entry = {"conn": self.conn, "code": code, "reason": self.ws.closeReason()}
        self.disconnects.append(entry)
        trace(f"ws disconnected {entry}")
        self._check_waiters()

    def _on_frame(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            msg = {}
        cmd = msg.get("command") if isinstance(msg.get("command"), dict) else {}
        frame = {
            "conn": self.conn,
            "type": msg.get("type"),
            "action": cmd.get("action"),
            "item_id": cmd.get("item_id"),
            "code": msg.get("code"),
            "bytes": len(text),
        }
        self.frames.append(frame)
        if frame["type"] == "connection:ack":
            self.acked = True
        elif frame["type"] == "pong":
            self.pongs_received += 1
        trace(f"frame in #{len(self.frames)} {text[:600]}")
        self._check_waiters()

    def _on_heartbeat_tick(self) -> None:
        # The app's own slot ran first and sent a ping if connected; its pong must not be
        # mistaken for the pong of a barrier.
        if self.service.connected_state:
            self.pings_sent += 1

    # ----- channel ---------------------------------------------------------------------------

    def _respond(self, req_id, ok: bool, payload) -> None:
        key = "result" if ok else "error"
        _CHANNEL.write(json.dumps({"id": req_id, "ok": ok, key: payload}, default=_jsonable) + "\n")
        _CHANNEL.flush()

    def _on_line(self, line: str) -> None:
        req_id = None
        try:
            req = json.loads(line)
            req_id = req.pop("id", None)
            cmd = req.pop("cmd")
            trace(f"cmd #{req_id} {cmd} {json.dumps(req)[:300]}")
            handler = getattr(self, f"cmd_{cmd}", None)
            if handler is None:
                raise CommandError(f"unknown command {cmd!r}")
            result = handler(req_id, **req)
            if result is not _PENDING:
                self._respond(req_id, True, result)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the test
            text = f"{type(e).__name__}: {e}"
            if not isinstance(e, CommandError):
                text += "\n" + traceback.format_exc()
            trace(f"cmd #{req_id} failed: {text}")
            self._respond(req_id, False, text)

    def _wait(self, req_id, predicate, timeout: float, describe: str):
        """Answer req_id once predicate() is true, or with an error at the deadline."""
        if predicate():
            return True
        self._waiters.append((req_id, predicate, time.monotonic() + timeout, describe))
        self._deadline_timer.start()
        return _PENDING

    def _check_waiters(self) -> None:
        now = time.monotonic()
        still = []
        for req_id, predicate, deadline, describe in self._waiters:
            if predicate():
                self._respond(req_id, True, True)
            elif now >= deadline:
                self._respond(req_id, False, f"timed out waiting for {describe}")
            else:
                still.append((req_id, predicate, deadline, describe))
        self._waiters = still
        if not still:
            self._deadline_timer.stop()

    # ----- helpers ---------------------------------------------------------------------------

    def _guard_modal_dialogs(self) -> None:
        """A modal message box would block the driver inside a nested event loop; record it
        and answer it as dismissed instead, so that a test can see it happened."""
        box = QtWidgets.QMessageBox
        driver = self

        def recorder(kind, answer):
            def show(*args, **kwargs):
                texts = [a for a in args if isinstance(a, str)]
                driver.dialogs.append(f"{kind}: {' | '.join(texts)}")
                trace(f"modal dialog suppressed: {kind}: {texts}")
                return answer

            return staticmethod(show)

        box.warning = recorder("warning", box.StandardButton.Ok)
        box.information = recorder("information", box.StandardButton.Ok)
        box.critical = recorder("critical", box.StandardButton.Ok)
        box.question = recorder("question", box.StandardButton.No)

        def box_exec(self_box):
            driver.dialogs.append(f"message box: {self_box.text()}")
            trace(f"modal dialog suppressed: {self_box.text()}")
            return int(box.StandardButton.Discard.value)

        box.exec = box_exec

    def _answer_collaboration_dialog(self, info: dict) -> None:
        """Run the Collaboration menu's path (`MainWindow.open_collaboration_dialog`) with the
        modal dialog answered as a user would fill it in and press OK. The host path starts no
        server of its own (the test runs the server)."""
        import optiverse.ui.views.collaboration_dialog as dialog_module

        class AnsweredDialog:
            server_process = None

            def __init__(self, parent=None):
                pass

            def exec(self):
                return int(QtWidgets.QDialog.DialogCode.Accepted.value)

            def get_connection_info(self):
                return dict(info)

        real = dialog_module.CollaborationDialog
        dialog_module.CollaborationDialog = AnsweredDialog
        try:
            self.w.open_collaboration_dialog()
        finally:
            dialog_module.CollaborationDialog = real

    def _serialisable_items(self):
        from optiverse.core.protocols import Serializable

        return [i for i in self.w.scene.items() if isinstance(i, Serializable)]

    def _item(self, uuid: str):
        found = [i for i in self._serialisable_items() if i.item_uuid == uuid]
        if not found:
            raise CommandError(f"item {uuid} is not in the window (it was removed from it)")
        if len(found) > 1:
            raise CommandError(f"item {uuid} is in the window {len(found)} times")
        return found[0]

    def _item_record(self, item) -> dict:
        from optiverse.objects.type_registry import TypeRegistry

        return {
            "uuid": item.item_uuid,
            "item_type": TypeRegistry.get_type_for_item(item),
            "data": item.to_dict(),
        }

    # ----- commands --------------------------------------------------------------------------

    def cmd_info(self, req_id):
        import optiverse

        return {"pid": os.getpid(), "optiverse": os.path.dirname(optiverse.__file__)}

    def cmd_set_magnetic_snap(self, req_id, on: bool):
        # The View menu's checkable action; its toggled signal runs _toggle_magnetic_snap.
        self.w.act_magnetic_snap.setChecked(bool(on))
        if self.w.magnetic_snap != bool(on):
            raise CommandError(f"magnetic_snap is {self.w.magnetic_snap} after toggling")
        return self.w.magnetic_snap

    def cmd_set_autotrace(self, req_id, on: bool):
        # View > Auto-trace.
        self.w.act_autotrace.setChecked(bool(on))
        if self.w.autotrace != bool(on):
            raise CommandError(f"autotrace is {self.w.autotrace} after toggling")
        return self.w.autotrace

    def cmd_host(self, req_id, port: int, session: str, user: str, use_current_canvas=True):
        self._answer_collaboration_dialog(
            {
                "mode": "host",
                "session_id": session,
                "user_id": user,
                "use_current_canvas": use_current_canvas,
                "host": "127.0.0.1",
                "port": int(port),
            }
        )
        return self.conn

    def cmd_join(self, req_id, url: str, session: str, user: str):
        self._answer_collaboration_dialog(
            {"mode": "connect", "server_url": url, "session_id": session, "user_id": user}
        )
        return self.conn

    def cmd_disconnect(self, req_id):
        # The slot the Collaboration > Disconnect action is connected to.
        self.w.disconnect_collaboration()
        return True

    def cmd_wait_acked(self, req_id, after_conn: int, timeout: float = 20.0):
        """Until a connection newer than `after_conn` got its connection:ack."""
        return self._wait(
            req_id,
            lambda: self.conn > after_conn and self.acked,
            timeout,
            f"a connection:ack on a connection after #{after_conn}",
        )

    def cmd_wait_disconnected(self, req_id, count: int, timeout: float = 20.0):
        """Until the client has seen `count` disconnections in all."""
        return self._wait(
            req_id,
            lambda: len(self.disconnects) >= count,
            timeout,
            f"disconnection #{count}",
        )

    def cmd_wait_log(self, req_id, message: str, since: int = 0, timeout: float = 20.0):
        """Until the app has logged exactly `message` (at index `since` or later)."""
        return self._wait(
            req_id,
            lambda: any(e["message"] == message for e in self.log[since:]),
            timeout,
            f"the log line {message!r}",
        )

    def cmd_wait_status(self, req_id, contains: str, since: int = 0, timeout: float = 20.0):
        """Until a status text (at index `since` or later) contains `contains`."""
        return self._wait(
            req_id,
            lambda: any(contains in text for text in self.status[since:]),
            timeout,
            f"a status text containing {contains!r}",
        )

    def cmd_barrier(self, req_id, timeout: float = 30.0):
        """The client's own heartbeat, then wait for its pong: everything it sent before was
        applied by the server, and every frame the server sent before has been handled."""
        if not self.service.connected_state:
            raise CommandError("barrier on a client that is not connected")
        conn = self.conn
        self.service._send_heartbeat()
        self.pings_sent += 1
        target = self.pings_sent
        return self._wait(
            req_id,
            lambda: self.conn == conn and self.pongs_received >= target,
            timeout,
            f"the pong of heartbeat #{target} on connection #{conn}",
        )

    def cmd_add(self, req_id, kind: str, x: float, y: float):
        """Place a component as a click in placement mode does (broadcast_add_item included)."""
        from optiverse.core.component_types import ComponentType

        item = self.w.placement_handler.place_component_at(
            ComponentType(kind), QtCore.QPointF(float(x), float(y))
        )
        if item is None:
            raise CommandError(f"placing {kind} created nothing")
        return item.item_uuid

    def cmd_move(self, req_id, uuid: str, x=None, y=None, angle=None):
        """One drag step: Qt's setPos/setRotation go through itemChange, which emits edited
        (broadcast_update_item) and calls broadcast_move_item, as a mouse drag does."""
        from optiverse.core.raytracing_math import user_angle_to_qt

        item = self._item(uuid)
        if x is not None and y is not None:
            item.setPos(float(x), float(y))
        if angle is not None:
            item.setRotation(user_angle_to_qt(float(angle)))
        return self._item_record(item)

    def cmd_delete(self, req_id, uuid: str):
        """Select the item and run the window's delete handler (Edit > Delete)."""
        item = self._item(uuid)
        self.w.scene.clearSelection()
        item.setSelected(True)
        self.w.delete_selected()
        return True

    def cmd_open_file(self, req_id, path: str):
        """File > Open with the file dialog answered by `path`."""
        dialog = QtWidgets.QFileDialog
        real = dialog.getOpenFileName
        dialog.getOpenFileName = staticmethod(lambda *a, **k: (path, "Optics Assembly (*.json)"))
        try:
            self.w.open_assembly()
        finally:
            dialog.getOpenFileName = real
        return len(self._serialisable_items())

    def cmd_state(self, req_id):
        return {
            "items": [self._item_record(i) for i in self._serialisable_items()],
            "role": self.manager.role,
            "initial_sync_complete": self.manager.initial_sync_complete,
            "connected": self.service.connected_state,
            "conn": self.conn,
            "dialogs": self.dialogs,
            # The menu's Disconnect item (the app enables it only if already connected when
            # its dialog returns, which a connection just opened never is).
            "disconnect_action_enabled": self.w.act_disconnect.isEnabled(),
        }

    def cmd_frames(self, req_id, since: int = 0):
        return self.frames[since:]

    def cmd_frame_count(self, req_id):
        return len(self.frames)

    def cmd_log(self, req_id, since: int = 0):
        return self.log[since:]

    def cmd_log_count(self, req_id):
        return len(self.log)

    def cmd_status(self, req_id):
        return self.status

    def cmd_disconnects(self, req_id):
        return self.disconnects

    def cmd_quit(self, req_id):
        # Closing the window runs the app's shutdown (its collaboration cleanup included).
        QtCore.QTimer.singleShot(0, self.w.close)
        QtCore.QTimer.singleShot(0, self.app.quit)
        return True


_PENDING = object()


def main() -> int:
    app = QtWidgets.QApplication(sys.argv[:1])
    driver = Driver(app)

    def read_stdin():
        for line in sys.stdin:
            if line.strip():
                driver.line_received.emit(line)
        # The test went away: end the client.
        QtCore.QMetaObject.invokeMethod(app, "quit", QtCore.Qt.ConnectionType.QueuedConnection)

    threading.Thread(target=read_stdin, daemon=True).start()
    _CHANNEL.write(json.dumps({"event": "ready", "pid": os.getpid()}) + "\n")
    _CHANNEL.flush()
    trace("ready")
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
