// The page's connection to a session, as an Optiverse desktop client (PROTOCOL §3 and the
// README's "Choices"): `/ws/{session}/{user}`, JSON text frames. Chosen over the Yjs endpoint
// because every message carries each item's whole data as plain JSON, so the page needs no Yjs
// decoder (ARCHITECTURE.md, "The browser pages").
//
// What the server does on this endpoint, and what this file relies on:
// * join order: `user:joined` naming ourselves first, then `connection:ack` with the user list;
// * no full state is pushed at join: we send `sync:request` on the ack, and the server answers
//   with `sync:full_state` once (at once, or as soon as the scene is initialized);
// * afterwards every change arrives as a `command` with the item's whole current data
//   (`add_item`, `update_item`, `remove_item`; never `move_item`);
// * nothing arriving for the idle timeout (90 s) closes us: we ping every 30 s like the app.

import { wsUrl } from './base.js';

const HEARTBEAT_MS = 30_000;
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 10_000;

/** Close codes after which reconnecting would not help (PROTOCOL §7). */
const FINAL_CODES = new Set([
  1008, // invalid path or policy
  4000, // replaced by a newer connection with our name: another tab of ours took over
  4401, // token expired
  4403, // token revoked
]);

/**
 * Events (CustomEvent, data in `detail`):
 * - `status` {state: 'connecting' | 'live' | 'retrying' | 'closed', code?, reason?}
 * - `ack` {users: [name...], user}: the people present when we joined
 * - `joined` / `left` {user}
 * - `fullstate` {items, version}: the whole scene (replaces what the page holds)
 * - `command` {action, item_type, item_id, data, user_id, timestamp}
 * - `error` {code, message}: the server refused something we sent
 */
export class DesktopLink extends EventTarget {
  constructor(session, user) {
    super();
    this.session = session;
    this.user = user;
    this.socket = null;
    this.heartbeat = null;
    this.retryMs = RETRY_FIRST_MS;
    this.stopped = false;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    this.socket?.close(1000);
  }

  /** Leaves and joins again under another name (the page's read-only toggle). */
  reconnectAs(user) {
    this.user = user;
    const old = this.socket;
    this.socket = null; // its close event is then ignored (see `closed`)
    clearInterval(this.heartbeat);
    this.heartbeat = null;
    old?.close(1000);
    this.retryMs = RETRY_FIRST_MS;
    if (!this.stopped) this.open();
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  open() {
    const path = `ws/${encodeURIComponent(this.session)}/${encodeURIComponent(this.user)}`;
    const socket = new WebSocket(wsUrl(path));
    this.socket = socket;
    this.emit('status', { state: 'connecting' });
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = (event) => this.closed(socket, event);
  }

  closed(socket, event) {
    if (socket !== this.socket) return;
    clearInterval(this.heartbeat);
    this.heartbeat = null;
    if (this.stopped || FINAL_CODES.has(event.code)) {
      this.emit('status', { state: 'closed', code: event.code, reason: event.reason });
      return;
    }
    // The server restarted, evicted us as too slow (1013) or went away: join again; the new
    // ack and full state replace whatever the page held.
    this.emit('status', { state: 'retrying', code: event.code, reason: event.reason });
    const wait = this.retryMs;
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
    setTimeout(() => this.stopped || this.open(), wait);
  }

  send(message) {
    if (this.socket?.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify({ ...message, user_id: this.user }));
    return true;
  }

  /** Sends one scene command, as the desktop client does on a local edit (PROTOCOL §3.3). */
  command(action, itemType, itemId, data) {
    return this.send({
      type: 'command',
      command: { action, item_type: itemType, item_id: itemId, data },
      timestamp: new Date().toISOString(),
    });
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return; // the server only sends JSON text on this endpoint; nothing to do with noise
    }
    switch (message.type) {
      case 'connection:ack':
        this.retryMs = RETRY_FIRST_MS;
        this.emit('ack', {
          user: this.user,
          users: (message.users ?? []).map((u) => u.user_id),
        });
        // The server pushes no full state at join: ask for it (README, "Choices").
        this.send({ type: 'sync:request' });
        clearInterval(this.heartbeat);
        this.heartbeat = setInterval(() => this.send({ type: 'ping' }), HEARTBEAT_MS);
        this.emit('status', { state: 'live' });
        break;
      case 'sync:full_state':
        this.emit('fullstate', {
          items: message.state?.items ?? [],
          version: message.state?.version ?? null,
        });
        break;
      case 'command':
        this.emit('command', {
          ...message.command,
          user_id: message.user_id,
          timestamp: message.timestamp,
        });
        break;
      case 'user:joined':
        // The first one names ourselves (it precedes the ack); the ack's list covers it.
        if (message.user_id !== this.user) this.emit('joined', { user: message.user_id });
        break;
      case 'user:left':
        this.emit('left', { user: message.user_id });
        break;
      case 'error':
        this.emit('error', { code: message.code, message: message.message });
        break;
      default:
        break; // pong, and anything newer servers may add
    }
  }
}
