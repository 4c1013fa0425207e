// Where things are, in the desktop app's own conventions (read from its code:
// objects/generic/component_item.py, objects/sources/source_item.py, core/raytracing_math.py,
// objects/views/graphics_view.py, objects/annotations/*.py).
//
// * World coordinates are the app's scene coordinates: millimetres, x to the right and y UP
//   (its view flips y once with scale(1, -1)). The SVG does the same flip once, around the
//   whole bench, so item data is used exactly as stored.
// * Components and sources are placed at (x_mm, y_mm) and rotated by Qt's
//   `setRotation(user_angle_to_qt(angle_deg))` = -angle_deg: a user angle turns clockwise on
//   screen (0 = right, 90 = down).
// * A component's interfaces are stored relative to its image centre. When the component has
//   an `image_path`, the app puts the item's origin on the centre of its FIRST interface (the
//   "picked line"), so every interface is drawn shifted by that centre. Without an image, no shift.
// * Rectangles store Qt's rotation itself (`angle_deg` = rotation()): counter-clockwise on screen.
// * Rulers and angle measures store scene points; text notes and rectangles store `x`, `y`.

import { itemType } from './scene.js';

export const DEG = Math.PI / 180;

const num = (v, fallback = 0) => (typeof v === 'number' && Number.isFinite(v) ? v : fallback);

/** The shift from stored interface coordinates to the item's own frame. */
export function pickedLineOffset(item) {
  const first = Array.isArray(item.interfaces) ? item.interfaces[0] : null;
  if (!item.image_path || !first) return [0, 0];
  return [
    (num(first.x1_mm) + num(first.x2_mm)) / 2,
    (num(first.y1_mm) + num(first.y2_mm)) / 2,
  ];
}

/** The item's rotation in world terms (counter-clockwise, degrees), as the SVG applies it. */
export function worldRotation(item) {
  switch (itemType(item)) {
    case 'rectangle':
      return num(item.angle_deg);
    case 'component':
    case 'source':
      return -num(item.angle_deg);
    default:
      return 'x_mm' in item ? -num(item.angle_deg) : 0;
  }
}

/** The point an item is placed at, in world coordinates, or null for items placed by points. */
export function itemOrigin(item) {
  if ('x_mm' in item || 'y_mm' in item) return [num(item.x_mm), num(item.y_mm)];
  const type = itemType(item);
  if (type === 'text' || type === 'rectangle') return [num(item.x), num(item.y)];
  return null;
}

/** Maps a point of the item's own frame to world coordinates. */
export function toWorld(item, [x, y]) {
  const [ox, oy] = itemOrigin(item) ?? [0, 0];
  const a = worldRotation(item) * DEG;
  const c = Math.cos(a);
  const s = Math.sin(a);
  return [ox + c * x - s * y, oy + s * x + c * y];
}

/** A component's interfaces in its own frame (shifted by the picked line). */
export function localInterfaces(item) {
  if (!Array.isArray(item.interfaces)) return [];
  const [dx, dy] = pickedLineOffset(item);
  return item.interfaces
    .filter((i) => i && typeof i === 'object')
    .map((iface) => ({
      iface,
      a: [num(iface.x1_mm) - dx, num(iface.y1_mm) - dy],
      b: [num(iface.x2_mm) - dx, num(iface.y2_mm) - dy],
    }));
}

/** A component's interfaces in world coordinates: what rays meet. */
export function worldInterfaces(item) {
  return localInterfaces(item).map(({ iface, a, b }) => ({
    iface,
    a: toWorld(item, a),
    b: toWorld(item, b),
  }));
}

/** Scene points of items placed by points (rulers, angle measures), else []. */
export function itemPoints(item) {
  const points = [];
  const push = (p) => {
    if (Array.isArray(p) && p.length >= 2) points.push([num(p[0]), num(p[1])]);
  };
  if (Array.isArray(item.points)) item.points.forEach(push);
  if (Array.isArray(item.p1)) [item.p1, item.p2].forEach(push); // the rulers' older format
  if (Array.isArray(item.vertex)) [item.vertex, item.point1, item.point2].forEach(push);
  return points;
}

/** World points that outline an item, for "fit to bench". */
export function outline(item) {
  const points = itemPoints(item);
  const origin = itemOrigin(item);
  if (origin) points.push(origin);
  for (const { a, b } of worldInterfaces(item)) points.push(a, b);
  const type = itemType(item);
  if (type === 'rectangle') {
    const w = num(item.width_mm, 60) / 2;
    const h = num(item.height_mm, 40) / 2;
    for (const p of [[-w, -h], [w, -h], [w, h], [-w, h]]) points.push(toWorld(item, p));
  }
  if (type === 'source' && origin) {
    const half = Math.max(1, num(item.size_mm) / 2);
    points.push(toWorld(item, [0, -half]), toWorld(item, [0, half]), toWorld(item, [18, 0]));
  }
  return points;
}

/** A copy of an item's data moved by (dx, dy) world millimetres, whatever places it. */
export function translated(item, dx, dy) {
  const out = structuredClone(item);
  const shift = (p) => (Array.isArray(p) ? [num(p[0]) + dx, num(p[1]) + dy, ...p.slice(2)] : p);
  if ('x_mm' in out || 'y_mm' in out) {
    out.x_mm = num(out.x_mm) + dx;
    out.y_mm = num(out.y_mm) + dy;
  } else if ('x' in out || 'y' in out) {
    out.x = num(out.x) + dx;
    out.y = num(out.y) + dy;
  }
  if (Array.isArray(out.points)) out.points = out.points.map(shift);
  for (const key of ['p1', 'p2', 'vertex', 'point1', 'point2']) {
    if (Array.isArray(out[key])) out[key] = shift(out[key]);
  }
  return out;
}

export { num };
