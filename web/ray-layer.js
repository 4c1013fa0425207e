// The rays on the bench, kept per source, so that a change re-traces only the sources whose
// light it can reach: a moved component can only change rays that pass through the box it
// left or the box it entered (a ray that meets it crosses its box, so the ray's own box does).
// Dragging one lens in a 1,000-item bench then re-traces a source or two, not all of them.

import { el } from './draw.js';
import { worldInterfaces } from './geometry.js';
import { collectSurfaces, traceSource } from './raytrace.js';
import { itemType } from './scene.js';

function boxOf(points) {
  if (points.length === 0) return null;
  const box = { minX: Infinity, minY: Infinity, maxX: -Infinity, maxY: -Infinity };
  for (const [x, y] of points) {
    box.minX = Math.min(box.minX, x);
    box.maxX = Math.max(box.maxX, x);
    box.minY = Math.min(box.minY, y);
    box.maxY = Math.max(box.maxY, y);
  }
  return box;
}

const SLACK = 1e-3;
const overlaps = (a, b) => a.minX <= b.maxX + SLACK && b.minX <= a.maxX + SLACK
  && a.minY <= b.maxY + SLACK && b.minY <= a.maxY + SLACK;

function polyline(path) {
  return el('polyline', {
    points: path.points.map(([x, y]) => `${x.toFixed(3)},${y.toFixed(3)}`).join(' '),
    stroke: path.color,
    'stroke-opacity': (0.25 + 0.6 * path.intensity).toFixed(2),
    class: 'ray',
  });
}

export class RayLayer {
  /** @param {SVGGElement} layer */
  constructor(layer) {
    this.layer = layer;
    /** source uuid -> {paths, boxes, g} */
    this.sources = new Map();
    /** component uuid -> the box of its surfaces when last traced */
    this.components = new Map();
    this.traced = 0; // sources traced by the last update (for the measurements)
  }

  clear() {
    this.layer.replaceChildren();
    this.sources.clear();
    this.components.clear();
  }

  /**
   * Brings the rays up to date with `items` (uuid -> data) after the items `changed` (all of
   * them when `whole`). Returns every path, sources in scene order (path measures count them).
   */
  update(items, changed, whole) {
    if (whole) this.clear();
    const touched = [];
    const retrace = new Set();
    for (const uuid of whole ? items.keys() : changed) {
      const item = items.get(uuid);
      const before = this.components.get(uuid);
      if (before) touched.push(before);
      this.components.delete(uuid);
      if (item && itemType(item) === 'component') {
        const box = boxOf(worldInterfaces(item).flatMap(({ a, b }) => [a, b]));
        if (box) {
          this.components.set(uuid, box);
          touched.push(box);
        }
      }
      if (!item || itemType(item) === 'source') retrace.add(uuid);
    }

    const surfaces = collectSurfaces(items.values());
    const budget = { segments: 0 };
    const all = [];
    this.traced = 0;
    const present = new Set();
    for (const [uuid, item] of items) {
      if (itemType(item) !== 'source') continue;
      present.add(uuid);
      let entry = this.sources.get(uuid);
      const stale = !entry || retrace.has(uuid)
        || entry.boxes.some((box) => box && touched.some((t) => overlaps(box, t)));
      if (stale) {
        const paths = traceSource(item, surfaces, budget);
        this.traced += 1;
        if (!entry) {
          entry = { g: el('g', { class: 'source-rays' }, this.layer) };
          this.sources.set(uuid, entry);
        }
        entry.paths = paths;
        entry.boxes = paths.map((p) => boxOf(p.points));
        entry.g.replaceChildren(...paths.map(polyline));
      }
      all.push(...entry.paths);
    }
    for (const [uuid, entry] of this.sources) {
      if (!present.has(uuid)) {
        entry.g.remove();
        this.sources.delete(uuid);
      }
    }
    return all;
  }
}
