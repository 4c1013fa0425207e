// SVG for one item, drawn from its own data the way the desktop app shows it: a component as
// its optical surfaces (each kind with its usual symbol, in the app's colours), a source as its
// emitter bar and direction arrow in its ray colour, annotations as the app's annotation items.
// Everything is built in world coordinates (mm, y up; see geometry.js) inside the bench group
// that flips y once; text is flipped back so it reads upright. Strokes keep their pixel width
// at every zoom (CSS `vector-effect: non-scaling-stroke`), like the app's cosmetic pens.

import {
  DEG, itemOrigin, itemPoints, localInterfaces, num, pickedLineOffset, worldRotation,
} from './geometry.js';
import { itemType } from './scene.js';

const SVG = 'http://www.w3.org/2000/svg';

export function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  parent?.appendChild(node);
  return node;
}

const fmt = (v) => (Math.round(v * 1000) / 1000).toString();
const pts = (list) => list.map(([x, y]) => `${fmt(x)},${fmt(y)}`).join(' ');

/** The desktop's colour per interface kind (ComponentItem._get_interface_color). */
const SURFACE_COLORS = {
  lens: '#3278dc',
  mirror: '#6e7681',
  beam_splitter: '#0fa050',
  beamsplitter: '#0fa050',
  dichroic: '#c832c8',
  waveplate: '#3fa83f',
  polarizing_interface: '#3fa83f',
  refractive_interface: '#6464ff',
  beam_block: '#323232',
};
const DEFAULT_SURFACE = '#9664ff';

/** Upright text at (x, y) in a y-up group; `size` in mm. */
function label(parent, text, x, y, size, attrs = {}) {
  const node = el('text', {
    x: fmt(x), y: fmt(-y), 'font-size': fmt(size), transform: 'scale(1,-1)', ...attrs,
  }, parent);
  node.textContent = text;
  return node;
}

/** Unit vectors along and across a segment, its length and middle. */
function frame(a, b) {
  const dx = b[0] - a[0];
  const dy = b[1] - a[1];
  const length = Math.hypot(dx, dy) || 1;
  const t = [dx / length, dy / length];
  return { t, n: [-t[1], t[0]], length, m: [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2] };
}

const at = (p, v, k) => [p[0] + v[0] * k, p[1] + v[1] * k];

/** A quadrilateral around a segment, `half` mm to each side. */
function plate(a, b, half) {
  const { n } = frame(a, b);
  return pts([at(a, n, half), at(b, n, half), at(b, n, -half), at(a, n, -half)]);
}

function drawLens(g, a, b, iface) {
  const { n, length, m } = frame(a, b);
  const efl = num(iface.efl_mm, 100);
  const bulge = length * 0.16;
  let d;
  if (efl >= 0) {
    // Converging: biconvex outline through both ends.
    const c1 = at(m, n, bulge * 2);
    const c2 = at(m, n, -bulge * 2);
    d = `M${fmt(a[0])},${fmt(a[1])} Q${fmt(c1[0])},${fmt(c1[1])} ${fmt(b[0])},${fmt(b[1])} `
      + `Q${fmt(c2[0])},${fmt(c2[1])} ${fmt(a[0])},${fmt(a[1])} Z`;
  } else {
    // Diverging: thick at the rims, thin in the middle.
    const rim = bulge * 0.8;
    const waist = length * 0.02;
    const [a1, b1, b2, a2] = [at(a, n, rim), at(b, n, rim), at(b, n, -rim), at(a, n, -rim)];
    const c1 = at(m, n, 2 * waist - rim);
    const c2 = at(m, n, rim - 2 * waist);
    d = `M${pts([a1])} Q${pts([c1])} ${pts([b1])} L${pts([b2])} Q${pts([c2])} ${pts([a2])} Z`;
  }
  el('path', { d, class: 'lens-body' }, g);
  el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface', stroke: SURFACE_COLORS.lens }, g);
}

function drawMirror(g, a, b, backTowards) {
  const { t, n, length } = frame(a, b);
  // Hatching behind the reflective face: towards the image centre (the mount), if known.
  const side = backTowards && (backTowards[0] * n[0] + backTowards[1] * n[1]) < 0 ? -1 : 1;
  const tick = Math.max(1.2, length * 0.07);
  const count = Math.max(4, Math.min(14, Math.round(length / tick)));
  const hatch = [];
  for (let i = 0; i <= count; i += 1) {
    const p = at(a, t, (length * i) / count);
    const q = at(at(p, n, side * tick), t, -tick);
    hatch.push(`M${pts([p])} L${pts([q])}`);
  }
  el('path', { d: hatch.join(' '), class: 'mirror-hatch' }, g);
  el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface mirror', stroke: SURFACE_COLORS.mirror }, g);
}

function drawSplitter(g, a, b, iface) {
  // A cube whose diagonal is the splitting surface.
  const { n, length, m } = frame(a, b);
  const corners = [a, at(m, n, length / 2), b, at(m, n, -length / 2)];
  el('polygon', {
    points: pts(corners), class: iface.is_polarizing ? 'cube polarizing' : 'cube',
  }, g);
  el('line', {
    x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface', stroke: SURFACE_COLORS.beam_splitter,
  }, g);
}

function drawDichroic(g, a, b) {
  const { length } = frame(a, b);
  el('polygon', { points: plate(a, b, Math.max(0.6, length * 0.05)), class: 'dichroic-plate' }, g);
  el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface', stroke: SURFACE_COLORS.dichroic }, g);
}

function polarizerLabel(iface) {
  const subtype = iface.polarizer_subtype ?? 'waveplate';
  if (subtype === 'waveplate') {
    const phase = Math.abs(num(iface.phase_shift_deg, 90)) % 360;
    if (Math.abs(phase - 180) < 1) return 'λ/2';
    if (Math.abs(phase - 90) < 1 || Math.abs(phase - 270) < 1) return 'λ/4';
    return `${fmt(phase)}°`;
  }
  return { linear_polarizer: 'Pol', circular_polarizer: 'CPol', faraday_rotator: 'FR' }[subtype] ?? '';
}

function drawPolarizing(g, a, b, iface) {
  const { length } = frame(a, b);
  el('polygon', { points: plate(a, b, Math.max(1, length * 0.08)), class: 'waveplate' }, g);
  el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface', stroke: SURFACE_COLORS.waveplate }, g);
  const text = polarizerLabel(iface);
  if (text) {
    // Beyond the plate's upper end, so it never sits on the beam.
    const { t } = frame(a, b);
    const end = t[1] >= 0 ? b : a;
    const size = Math.max(3, length * 0.22);
    const p = at(end, t[1] >= 0 ? t : [-t[0], -t[1]], size * 0.4);
    label(g, text, p[0], p[1], size, { class: 'surface-label', 'text-anchor': 'middle' });
  }
}

function drawBlock(g, a, b) {
  const { length } = frame(a, b);
  el('polygon', { points: plate(a, b, Math.max(1, length * 0.12)), class: 'beam-block' }, g);
}

function drawRefractive(g, a, b, iface) {
  const radius = num(iface.radius_of_curvature_mm);
  const { length } = frame(a, b);
  const color = SURFACE_COLORS.refractive_interface;
  if (iface.is_curved && Math.abs(radius) > length / 2) {
    // The app's arc: the centre lies on the side the radius's sign says.
    const sweep = radius > 0 ? 0 : 1;
    el('path', {
      d: `M${pts([a])} A${fmt(Math.abs(radius))},${fmt(Math.abs(radius))} 0 0 ${sweep} ${pts([b])}`,
      class: 'surface', stroke: color, fill: 'none',
    }, g);
  } else {
    el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface', stroke: color }, g);
  }
}

function drawComponent(g, item) {
  const surfaces = localInterfaces(item);
  if (surfaces.length === 0) {
    // No optical surface (a table, a breadboard): the app's dashed placeholder with the name.
    const s = num(item.object_height_mm, 50);
    el('rect', { x: -s / 2, y: -s / 2, width: s, height: s, class: 'placeholder' }, g);
    label(g, item.name ?? 'component', 0, 0, Math.max(3, s * 0.12), { class: 'placeholder-label', 'text-anchor': 'middle' });
    return;
  }
  // The image centre in the item's frame: the mount, behind a mirror's face.
  const [ox, oy] = pickedLineOffset(item);
  for (const { iface, a, b } of surfaces) {
    const hit = el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'hit' }, g);
    hit.dataset.kind = iface.element_type ?? '';
    switch (iface.element_type) {
      case 'lens':
        drawLens(g, a, b, iface);
        break;
      case 'mirror': {
        const { m } = frame(a, b);
        const back = [-ox - m[0], -oy - m[1]];
        drawMirror(g, a, b, Math.hypot(back[0], back[1]) > 1e-6 ? back : null);
        break;
      }
      case 'beam_splitter':
      case 'beamsplitter':
        drawSplitter(g, a, b, iface);
        break;
      case 'dichroic':
        drawDichroic(g, a, b);
        break;
      case 'waveplate':
      case 'polarizing_interface':
        drawPolarizing(g, a, b, iface);
        break;
      case 'beam_block':
        drawBlock(g, a, b);
        break;
      case 'refractive_interface':
        drawRefractive(g, a, b, iface);
        break;
      default:
        el('line', { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: 'surface', stroke: DEFAULT_SURFACE }, g);
    }
  }
}

function drawSource(g, item) {
  // SourceItem: a bar across the aperture (7 px) and an 18 mm arrow along the beam (3 px).
  const half = Math.max(1, num(item.size_mm) / 2);
  const color = typeof item.color_hex === 'string' ? item.color_hex : '#DC143C';
  el('line', { x1: 0, y1: -half - 4, x2: 0, y2: half + 4, class: 'hit' }, g);
  el('line', { x1: 0, y1: -half, x2: 0, y2: half, class: 'source-bar', stroke: color }, g);
  el('line', { x1: 0, y1: 0, x2: 18, y2: 0, class: 'source-arrow', stroke: color }, g);
  el('polygon', { points: pts([[18, 0], [12, 3.2], [12, -3.2]]), fill: color, class: 'source-head' }, g);
}

function drawRuler(g, item) {
  const points = itemPoints(item);
  if (points.length < 2) return;
  let total = 0;
  for (let i = 1; i < points.length; i += 1) {
    total += Math.hypot(points[i][0] - points[i - 1][0], points[i][1] - points[i - 1][1]);
  }
  el('polyline', { points: pts(points), class: 'hit' }, g);
  el('polyline', { points: pts(points), class: 'ruler' }, g);
  const tickLen = Math.max(2, total * 0.03);
  const ends = [[points[0], points[1]], [points.at(-1), points.at(-2)]];
  for (const [p, q] of ends) {
    const { n } = frame(p, q);
    el('line', { x1: at(p, n, tickLen)[0], y1: at(p, n, tickLen)[1], x2: at(p, n, -tickLen)[0], y2: at(p, n, -tickLen)[1], class: 'ruler' }, g);
  }
  const mid = frame(points[0], points[1]);
  const anchor = at(mid.m, mid.n, tickLen * 1.3);
  label(g, `${total.toFixed(1)} mm`, anchor[0], anchor[1], Math.max(3, Math.min(12, total * 0.05)), {
    class: 'ruler-label', 'text-anchor': 'middle',
  });
}

function drawAngle(g, item) {
  const points = itemPoints(item);
  if (points.length < 3) return;
  const [v, p1, p2] = points;
  el('polyline', { points: pts([p1, v, p2]), class: 'hit' }, g);
  el('polyline', { points: pts([p1, v, p2]), class: 'ruler' }, g);
  const a1 = Math.atan2(p1[1] - v[1], p1[0] - v[0]);
  const a2 = Math.atan2(p2[1] - v[1], p2[0] - v[0]);
  let sweep = a2 - a1;
  while (sweep <= -Math.PI) sweep += 2 * Math.PI;
  while (sweep > Math.PI) sweep -= 2 * Math.PI;
  const r = 0.3 * Math.min(Math.hypot(p1[0] - v[0], p1[1] - v[1]), Math.hypot(p2[0] - v[0], p2[1] - v[1]));
  const s = [v[0] + r * Math.cos(a1), v[1] + r * Math.sin(a1)];
  const e = [v[0] + r * Math.cos(a2), v[1] + r * Math.sin(a2)];
  el('path', { d: `M${pts([s])} A${fmt(r)},${fmt(r)} 0 0 ${sweep > 0 ? 1 : 0} ${pts([e])}`, class: 'ruler', fill: 'none' }, g);
  const mid = a1 + sweep / 2;
  label(g, `${Math.abs(sweep / DEG).toFixed(1)}°`, v[0] + 1.5 * r * Math.cos(mid), v[1] + 1.5 * r * Math.sin(mid), Math.max(3, r * 0.5), {
    class: 'ruler-label', 'text-anchor': 'middle',
  });
}

function drawText(g, item) {
  // TextNoteItem: the text's top-left corner at (x, y); a font of `point_size` pt is that
  // many scene units high at 96 dpi, as in the app.
  const size = (num(item.point_size, 12) * 96) / 72;
  const lines = String(item.text ?? 'Text').split('\n');
  const text = el('text', {
    x: 0, y: 0, 'font-size': fmt(size), transform: 'scale(1,-1)', class: 'note',
    fill: typeof item.color === 'string' ? item.color : '#0a0a28', 'dominant-baseline': 'hanging',
  }, g);
  lines.forEach((line, i) => {
    const span = el('tspan', { x: 0, dy: i === 0 ? 0 : fmt(size * 1.2) }, text);
    span.textContent = line;
  });
}

function drawRectangle(g, item) {
  const w = num(item.width_mm, 60);
  const h = num(item.height_mm, 40);
  el('rect', { x: -w / 2, y: -h / 2, width: w, height: h, class: 'annotation-rect' }, g);
}

function drawUnknown(g, item) {
  el('polygon', { points: pts([[0, 6], [6, 0], [0, -6], [-6, 0]]), class: 'unknown' }, g);
  label(g, itemType(item), 8, -2, 5, { class: 'placeholder-label' });
}

/** What the hover text says of an item. */
export function describe(item) {
  const type = itemType(item);
  if (item.name) return item.name;
  if (type === 'source') {
    const wl = num(item.wavelength_nm);
    return `Source${wl ? ` ${fmt(wl)} nm` : ''}`;
  }
  if (type === 'text') return `Text: ${item.text ?? ''}`;
  return type.replace('_', ' ');
}

/** A new `<g>` for the item, placed and rotated; its children are in the item's own frame. */
export function drawItem(uuid, item) {
  const type = itemType(item);
  const g = el('g', { class: `item type-${type.replace(/[^a-z0-9_-]/gi, '')}` });
  g.dataset.uuid = uuid;
  g.dataset.type = type;
  const origin = itemOrigin(item);
  if (origin) {
    g.setAttribute('transform', `translate(${fmt(origin[0])} ${fmt(origin[1])}) rotate(${fmt(worldRotation(item))})`);
  }
  const title = el('title', {}, g);
  title.textContent = describe(item);
  switch (type) {
    case 'component':
      drawComponent(g, item);
      break;
    case 'source':
      drawSource(g, item);
      break;
    case 'ruler':
      drawRuler(g, item);
      break;
    case 'angle_measure':
    case 'angle':
      drawAngle(g, item);
      break;
    case 'text':
      drawText(g, item);
      break;
    case 'rectangle':
      drawRectangle(g, item);
      break;
    case 'path_measure':
      break; // drawn along the traced rays (draw.js drawPathMeasure)
    default:
      if (origin) drawUnknown(g, item);
  }
  return g;
}

/** Total length of a polyline and the point at a distance along it. */
function walk(points, distance) {
  let left = distance;
  for (let i = 1; i < points.length; i += 1) {
    const [p, q] = [points[i - 1], points[i]];
    const len = Math.hypot(q[0] - p[0], q[1] - p[1]);
    if (left <= len) return { index: i, point: len ? at(p, [(q[0] - p[0]) / len, (q[1] - p[1]) / len], left) : p };
    left -= len;
  }
  return { index: points.length, point: points.at(-1) };
}

/**
 * A path measure (PathMeasureItem): the stretch of ray path `ray_index` between the fractions
 * `start_param` and `end_param` of its length, with its length. Empty when that path is not traced.
 */
export function drawPathMeasure(uuid, item, paths) {
  const g = el('g', { class: 'item type-path_measure' });
  g.dataset.uuid = uuid;
  g.dataset.type = 'path_measure';
  const title = el('title', {}, g);
  title.textContent = describe(item);
  const path = paths[Math.round(num(item.ray_index, -1))];
  if (!path) return g;
  let total = 0;
  for (let i = 1; i < path.points.length; i += 1) {
    total += Math.hypot(path.points[i][0] - path.points[i - 1][0], path.points[i][1] - path.points[i - 1][1]);
  }
  let [s, e] = [num(item.start_param, 0), num(item.end_param, 1)].map((v) => Math.min(1, Math.max(0, v)));
  if (s > e) [s, e] = [e, s];
  const start = walk(path.points, s * total);
  const end = walk(path.points, e * total);
  const stretch = [start.point, ...path.points.slice(start.index, end.index), end.point];
  el('polyline', { points: pts(stretch), class: 'hit' }, g);
  el('polyline', { points: pts(stretch), class: 'path-measure' }, g);
  const mid = walk(stretch, ((e - s) * total) / 2).point;
  const prefix = item.label_prefix ? `${item.label_prefix}: ` : '';
  label(g, `${prefix}${((e - s) * total).toFixed(1)} mm`, mid[0], mid[1] + 3, 6, { class: 'ruler-label', 'text-anchor': 'middle' });
  return g;
}
