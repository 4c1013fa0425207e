// Where the desktop app puts an item's parts, in world millimetres (y up), re-derived here from
// the app's code independently of the page (web/geometry.js), and anchored to numbers the real
// app computed (DESKTOP_INTERFACES below).

const DEG = Math.PI / 180;
const rot = ([x, y], deg) => {
  const a = deg * DEG;
  return [Math.cos(a) * x - Math.sin(a) * y, Math.sin(a) * x + Math.cos(a) * y];
};
const add = (p, q) => [p[0] + q[0], p[1] + q[1]];

/** The item's type as the server reports it. */
export const typeOf = (item) => item.item_type ?? item._type ?? 'component';

/**
 * Named world points of an item: what the page must draw where.
 * Components: each interface's ends (`iface0.a`, `iface0.b`, ...). ComponentItem places its
 * origin on the first interface's centre when it has an image (the "picked line"), and is
 * rotated by Qt's -angle_deg. Sources: the emitter's centre and its arrow's tip (18 mm along
 * -angle_deg). Rulers: their points. Text notes: (x, y). Rectangles: corners, rotated by
 * +angle_deg (Qt's own rotation).
 */
export function expectedPoints(item) {
  const type = typeOf(item);
  const out = {};
  if (type === 'component') {
    const ifaces = item.interfaces ?? [];
    const first = ifaces[0];
    const offset = item.image_path && first
      ? [(first.x1_mm + first.x2_mm) / 2, (first.y1_mm + first.y2_mm) / 2]
      : [0, 0];
    ifaces.forEach((f, i) => {
      for (const [end, p] of [['a', [f.x1_mm, f.y1_mm]], ['b', [f.x2_mm, f.y2_mm]]]) {
        const local = [p[0] - offset[0], p[1] - offset[1]];
        out[`iface${i}.${end}`] = add([item.x_mm, item.y_mm], rot(local, -item.angle_deg));
      }
    });
  } else if (type === 'source') {
    out.origin = [item.x_mm, item.y_mm];
    out.arrow = add([item.x_mm, item.y_mm], rot([18, 0], -item.angle_deg));
  } else if (type === 'ruler') {
    item.points.forEach((p, i) => { out[`point${i}`] = p; });
  } else if (type === 'text') {
    out.origin = [item.x, item.y];
  } else if (type === 'rectangle') {
    const [w, h] = [item.width_mm / 2, item.height_mm / 2];
    [[-w, -h], [w, -h], [w, h], [-w, h]].forEach((c, i) => {
      out[`corner${i}`] = add([item.x, item.y], rot(c, item.angle_deg));
    });
  }
  return out;
}

/**
 * Interface ends in scene coordinates as the real desktop app (upstream, unchanged) reported
 * them for the fixtures (ComponentItem.get_interfaces_scene after opening each file), rounded
 * to 0.01 mm: item name -> [[x1, y1], [x2, y2]].
 */
export const DESKTOP_INTERFACES = {
  'two_mirror_steering': [
    ['M1', [[53.46, -22.7], [72.7, -3.46]]],
    ['M2', [[53.46, 77.3], [72.7, 96.54]]],
  ],
  'mach_zehnder_skeleton': [
    ['BS1', [[112.7, 12.7], [87.3, -12.7]]],
    ['MT', [[203.46, -22.7], [222.7, -3.46]]],
    ['MR', [[103.46, 77.3], [122.7, 96.54]]],
  ],
  'hwp_pbs_splitter': [
    ['HWP1', [[60.0, 15.25], [60.0, -15.25]]],
    ['PBS1', [[119.6, 25.4], [170.4, -25.4]]],
  ],
};
