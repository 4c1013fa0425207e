// Dragging an item moves it for everyone, the way the desktop app does it: each drag step
// sends `move_item` and then `update_item`, both with the item's whole data (PROTOCOL §3.3).
// Steps are sent at most once per animation frame (the app sends on every mouse event; the
// server applies either the same), and the page shows the move at once, before the server's
// answer: the server sends us nothing back unless the document differs from what we sent.

import { translated } from './geometry.js';

export class Dragging {
  /**
   * @param {SVGSVGElement} svg
   * @param {import('./viewport.js').Viewport} viewport
   * @param {import('./scene.js').Scene} scene
   * @param {import('./desktop-link.js').DesktopLink} link
   * @param {() => boolean} allowed whether the page may edit now (connected, not read-only)
   */
  constructor(svg, viewport, scene, link, allowed) {
    Object.assign(this, { svg, viewport, scene, link, allowed });
    this.active = null;
    this.pending = false;
    svg.addEventListener('pointerdown', (event) => this.down(event), { capture: true });
    svg.addEventListener('pointermove', (event) => this.move(event));
    svg.addEventListener('pointerup', (event) => this.up(event));
    svg.addEventListener('pointercancel', (event) => this.up(event));
  }

  down(event) {
    if (event.button !== 0 || !this.allowed()) return;
    const node = event.target.closest?.('.item');
    const uuid = node?.dataset.uuid;
    const item = uuid && this.scene.items.get(uuid);
    if (!item || item.locked === true || node.dataset.type === 'path_measure') return;
    event.stopPropagation(); // not a pan
    this.active = {
      uuid,
      id: event.pointerId,
      start: this.viewport.toWorld(event.clientX, event.clientY),
      original: structuredClone(item),
      data: item,
    };
    this.svg.setPointerCapture(event.pointerId);
    this.svg.classList.add('dragging');
  }

  move(event) {
    const drag = this.active;
    if (!drag || event.pointerId !== drag.id) return;
    const [x, y] = this.viewport.toWorld(event.clientX, event.clientY);
    drag.data = translated(drag.original, x - drag.start[0], y - drag.start[1]);
    this.scene.apply({ action: 'update_item', item_type: drag.data.item_type, item_id: drag.uuid, data: drag.data });
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.flush());
    }
  }

  flush() {
    this.pending = false;
    const drag = this.active ?? this.last;
    if (!drag || drag.sent === drag.data) return;
    drag.sent = drag.data;
    const { item_type: type, ...data } = drag.data;
    // The desktop client's dict has no `uuid`/`item_type` keys of its own: send what it sends.
    delete data.uuid;
    if ('x_mm' in data) this.link.command('move_item', type, drag.uuid, data);
    this.link.command('update_item', type, drag.uuid, data);
  }

  up(event) {
    const drag = this.active;
    if (!drag || event.pointerId !== drag.id) return;
    this.active = null;
    this.last = drag;
    this.svg.classList.remove('dragging');
    this.flush();
    this.last = null;
  }
}
