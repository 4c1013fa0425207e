// A minimal Optiverse desktop-protocol client for the browser test (PROTOCOL §3, README
// "Choices"): joins `/ws/{session}/{user}`, waits for its ack, and lets the test await the
// messages it receives.

import WebSocket from 'ws';

const PATIENCE_MS = 20_000;

export class DesktopClient {
  static async join(base, session, user) {
    const client = new DesktopClient(base, session, user);
    await client.waitFor((m) => m.type === 'connection:ack', 'connection:ack');
    return client;
  }

  constructor(base, session, user) {
    this.user = user;
    this.received = [];
    this.waiters = [];
    const url = `${base.replace(/^http/, 'ws')}/ws/${encodeURIComponent(session)}/${encodeURIComponent(user)}`;
    this.ws = new WebSocket(url);
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    });
    this.ws.on('message', (data) => {
      const message = JSON.parse(data.toString());
      this.received.push(message);
      this.waiters = this.waiters.filter((w) => !w.check());
    });
  }

  async send(message) {
    await this.opened;
    this.ws.send(JSON.stringify({ ...message, user_id: this.user }));
  }

  command(action, itemType, itemId, data) {
    return this.send({
      type: 'command',
      command: { action, item_type: itemType, item_id: itemId, data },
      timestamp: new Date().toISOString(),
    });
  }

  /** The first message received (from `from` on) that matches, awaited with a deadline. */
  waitFor(match, what, from = 0) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = this.received.slice(from).find(match);
        if (found) {
          clearTimeout(timer);
          resolve(found);
        }
        return Boolean(found);
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.check !== check);
        reject(new Error(`${this.user}: no ${what} within ${PATIENCE_MS} ms`));
      }, PATIENCE_MS);
      if (!check()) this.waiters.push({ check });
    });
  }

  /** A round trip: everything sent before it was applied when the pong comes back. */
  async barrier() {
    const from = this.received.length;
    await this.send({ type: 'ping' });
    await this.waitFor((m) => m.type === 'pong', 'pong', from);
  }

  /** Uploads a canvas as the desktop host does (the first upload initializes the scene). */
  async upload(items) {
    await this.send({ type: 'sync:full_state', state: { items } });
    await this.barrier();
  }

  /** Asks for the scene, as a joining desktop client does, and returns its items. */
  async fullState() {
    const from = this.received.length;
    await this.send({ type: 'sync:request' });
    const message = await this.waitFor((m) => m.type === 'sync:full_state', 'sync:full_state', from);
    return message.state.items;
  }

  close() {
    const closed = new Promise((resolve) => this.ws.once('close', resolve));
    this.ws.close(1000);
    return closed;
  }
}
