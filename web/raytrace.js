// A plain 2D ray trace, after the desktop app's engine (raytracing/engine.py and
// raytracing/elements/*.py), without polarization or intensity physics beyond splitting:
// rays start as the app starts them, bend at thin lenses (θ_out = θ_in - y/f), reflect off
// mirrors, split at beam splitters, pass or reflect at dichroics by wavelength, stop at beam
// blocks, and pass everything else straight. World coordinates (mm, y up), as geometry.js.

import { DEG, num, worldInterfaces } from './geometry.js';
import { itemType } from './scene.js';

const MAX_EVENTS = 80; // the app's default is of this order; keeps a mirror cavity finite
const MIN_INTENSITY = 0.02; // below this a branch is not drawn (the app's min_intensity idea)
const MAX_SEGMENTS = 50_000; // bounds the whole trace of a huge scene
const EPS = 1e-6;

/** The rays a source starts (engine.py `_generate_rays_from_source`). */
function sourceRays(source) {
  const base = -num(source.angle_deg) * DEG; // user angles are clockwise
  const spread = num(source.spread_deg) * DEG;
  const n = Math.max(1, Math.min(2001, Math.round(num(source.n_rays, 1))));
  const size = num(source.size_mm);
  const offsets = n <= 1 || size === 0
    ? [0]
    : Array.from({ length: n }, (_, i) => -size / 2 + (size * i) / (n - 1));
  const rays = [];
  offsets.forEach((offset, i) => {
    const fan = spread === 0 || offsets.length <= 1 ? 0 : -spread + (2 * spread * i) / (offsets.length - 1);
    const angle = base + fan;
    const dir = [Math.cos(angle), Math.sin(angle)];
    const perp = [-Math.sin(angle), Math.cos(angle)];
    rays.push({
      pos: [num(source.x_mm) + offset * perp[0], num(source.y_mm) + offset * perp[1]],
      dir,
      remaining: Math.max(0, num(source.ray_length_mm, 1000)),
      intensity: 1,
      events: 0,
    });
  });
  return rays;
}

/** Precomputed segments of every component's interfaces (what `traceSource` needs). */
export function collectSurfaces(items) {
  const surfaces = [];
  for (const item of items) {
    if (itemType(item) !== 'component') continue;
    for (const { iface, a, b } of worldInterfaces(item)) {
      const t = [b[0] - a[0], b[1] - a[1]];
      const length = Math.hypot(t[0], t[1]);
      if (length < EPS) continue;
      surfaces.push({
        iface,
        a,
        b,
        tangent: [t[0] / length, t[1] / length],
        normal: [-t[1] / length, t[0] / length],
        center: [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2],
        minX: Math.min(a[0], b[0]),
        maxX: Math.max(a[0], b[0]),
        minY: Math.min(a[1], b[1]),
        maxY: Math.max(a[1], b[1]),
      });
    }
  }
  return surfaces;
}

/** Distance along the ray to the nearest surface it meets within `reach`, or null. */
function nearestHit(pos, dir, reach, surfaces, skip) {
  let best = null;
  // Box of the segment the ray can cover: a cheap reject before the exact test.
  const ex = pos[0] + dir[0] * reach;
  const ey = pos[1] + dir[1] * reach;
  const boxMinX = Math.min(pos[0], ex);
  const boxMaxX = Math.max(pos[0], ex);
  const boxMinY = Math.min(pos[1], ey);
  const boxMaxY = Math.max(pos[1], ey);
  for (const s of surfaces) {
    if (s === skip) continue;
    if (s.maxX < boxMinX || s.minX > boxMaxX || s.maxY < boxMinY || s.minY > boxMaxY) continue;
    const ex2 = s.b[0] - s.a[0];
    const ey2 = s.b[1] - s.a[1];
    const denom = dir[0] * ey2 - dir[1] * ex2;
    if (Math.abs(denom) < 1e-12) continue; // parallel
    const wx = s.a[0] - pos[0];
    const wy = s.a[1] - pos[1];
    const t = (wx * ey2 - wy * ex2) / denom; // along the ray
    const u = (wx * dir[1] - wy * dir[0]) / denom; // along the surface, 0..1
    if (t <= EPS || t > reach || u < 0 || u > 1) continue;
    if (!best || t < best.t) best = { t, surface: s };
  }
  return best;
}

const dot = (a, b) => a[0] * b[0] + a[1] * b[1];

function reflect(dir, normal) {
  const d = 2 * dot(dir, normal);
  return [dir[0] - d * normal[0], dir[1] - d * normal[1]];
}

function thinLens(dir, hit, s) {
  const normal = dot(dir, s.normal) < 0 ? [-s.normal[0], -s.normal[1]] : s.normal;
  const y = dot([hit[0] - s.center[0], hit[1] - s.center[1]], s.tangent);
  const efl = num(s.iface.efl_mm, 100);
  const thetaIn = Math.atan2(dot(dir, s.tangent), dot(dir, normal));
  const thetaOut = Math.abs(efl) > 1e-12 ? thetaIn - y / efl : thetaIn;
  return [
    Math.cos(thetaOut) * normal[0] + Math.sin(thetaOut) * s.tangent[0],
    Math.cos(thetaOut) * normal[1] + Math.sin(thetaOut) * s.tangent[1],
  ];
}

/** A fraction from a percentage field (the app stores 0..100). */
const fraction = (value, fallback) => Math.min(1, Math.max(0, num(value, fallback) / 100));

/** What a ray becomes at a surface: [[direction, intensity factor], ...] (empty: absorbed). */
function interact(dir, hit, s, wavelength) {
  const iface = s.iface;
  switch (iface.element_type) {
    case 'lens':
      return [[thinLens(dir, hit, s), 1]];
    case 'mirror':
      return [[reflect(dir, s.normal), fraction(iface.reflectivity, 100)]];
    case 'beam_splitter':
    case 'beamsplitter': {
      // A polarizing splitter sorts by polarization, which this trace does not follow: draw
      // both ways at half intensity. A plain one splits by its T/R percentages.
      const [t, r] = iface.is_polarizing
        ? [0.5, 0.5]
        : [fraction(iface.split_T, 50), fraction(iface.split_R, 50)];
      return [[dir, t], [reflect(dir, s.normal), r]];
    }
    case 'dichroic': {
      const longpass = (iface.pass_type ?? 'longpass') !== 'shortpass';
      const above = wavelength >= num(iface.cutoff_wavelength_nm, 550);
      return longpass === above ? [[dir, 1]] : [[reflect(dir, s.normal), 1]];
    }
    case 'beam_block':
      return [];
    default:
      return [[dir, 1]]; // waveplates, polarizers, refractive interfaces: straight on
  }
}

/**
 * The ray paths of one source: [{points: [[x, y], ...], color, intensity}], its rays in order,
 * each ray's branches after it. `budget.segments` bounds the work across calls.
 */
export function traceSource(source, surfaces, budget = { segments: 0 }) {
  const paths = [];
  const color = typeof source.color_hex === 'string' ? source.color_hex : '#DC143C';
  const wavelength = num(source.wavelength_nm, 633);
  const stack = sourceRays(source).reverse();
  while (stack.length > 0 && budget.segments < MAX_SEGMENTS) {
    const ray = stack.pop();
    const points = [ray.pos];
    let { pos, dir, remaining, events } = ray;
    let skip = ray.skip ?? null;
    while (remaining > EPS && budget.segments < MAX_SEGMENTS) {
      budget.segments += 1;
      const hit = nearestHit(pos, dir, remaining, surfaces, skip);
      if (!hit) {
        points.push([pos[0] + dir[0] * remaining, pos[1] + dir[1] * remaining]);
        break;
      }
      const at = [pos[0] + dir[0] * hit.t, pos[1] + dir[1] * hit.t];
      points.push(at);
      remaining -= hit.t;
      events += 1;
      if (events > MAX_EVENTS) break;
      const outs = interact(dir, at, hit.surface, wavelength)
        .filter(([, factor]) => ray.intensity * factor >= MIN_INTENSITY);
      if (outs.length === 0) break;
      if (outs.length === 1 && outs[0][1] === 1) {
        [[dir]] = outs;
        pos = at;
        skip = hit.surface;
        continue;
      }
      // A split or a loss: this path ends here, each outcome goes on as a path of its own
      // (so each is drawn at its own intensity).
      for (const [branchDir, factor] of [...outs].reverse()) {
        stack.push({
          pos: at, dir: branchDir, remaining, intensity: ray.intensity * factor, events,
          skip: hit.surface,
        });
      }
      break;
    }
    paths.push({ points, color, intensity: ray.intensity });
  }
  return paths;
}

/** Every ray path of the scene, sources in scene order (see `traceSource`). */
export function traceScene(items) {
  const list = [...items];
  const surfaces = collectSurfaces(list);
  const budget = { segments: 0 };
  return list.filter((i) => itemType(i) === 'source').flatMap((s) => traceSource(s, surfaces, budget));
}
