// The live bench page, `/s/{session}`: wires the connection (desktop-link.js), the scene copy
// (scene.js), the drawing (draw.js, raytrace.js), the camera (viewport.js), dragging (drag.js)
// and the people list (people.js). Changes are drawn on the next animation frame, only the
// items they touched (plus the rays, which depend on everything).

import { sessionFromLocation, viewUrl } from './base.js';
import { DesktopLink } from './desktop-link.js';
import { describe, drawItem, drawPathMeasure, el } from './draw.js';
import { Dragging } from './drag.js';
import { outline } from './geometry.js';
import { BROWSER_PREFIX, People, WATCHING_PREFIX } from './people.js';
import { RayLayer } from './ray-layer.js';
import { Scene, itemType } from './scene.js';
import { Viewport } from './viewport.js';

const $ = (id) => document.getElementById(id);

const session = sessionFromLocation();
// A name that says what we are to everyone else's user list: `browser-` while the page may
// edit, `watching-` while it is read-only (`?watch=1`, or the toggle). The server lists every
// desktop-protocol connection as a user, so a watching page shows in people lists, named as a
// watcher (ARCHITECTURE.md, "The browser pages"). The suffix is random so that tabs never
// replace each other (a second connection with the same name would, PROTOCOL §3.5).
const suffix = [...crypto.getRandomValues(new Uint8Array(2))].map((b) => b.toString(16).padStart(2, '0')).join('');
const nameFor = (watching) => `${watching ? WATCHING_PREFIX : BROWSER_PREFIX}${suffix}`;
const watchParam = new URL(location.href).searchParams.get('watch');
$('readonly').checked = watchParam === '1' || watchParam === 'true';
let user = nameFor($('readonly').checked);

const svg = $('bench');
const layers = {
  background: $('layer-background'),
  rays: $('layer-rays'),
  components: $('layer-components'),
  sources: $('layer-sources'),
  annotations: $('layer-annotations'),
  measures: $('layer-measures'),
};
const viewport = new Viewport(svg, $('camera'), $('grid'), $('scalebar'));
const scene = new Scene();
const link = new DesktopLink(session, user);
const people = new People($('people'));
const rays = new RayLayer(layers.rays);
let live = false;
const dragging = new Dragging(svg, viewport, scene, link, () => live && !$('readonly').checked);

// What the browser test and the status line read: render counts and times.
const stats = { renders: 0, lastRenderMs: 0, lastTraceMs: 0, fullRenders: [] };
window.benchStats = stats;

/** uuid -> its <g>. */
const nodes = new Map();
let dirty = new Set();
let whole = false;
let frame = 0;
let fitted = false;

function layerOf(item) {
  switch (itemType(item)) {
    case 'component':
      return Array.isArray(item.interfaces) && item.interfaces.length ? layers.components : layers.background;
    case 'source':
      return layers.sources;
    case 'path_measure':
      return layers.measures;
    case 'rectangle':
      return layers.background; // a filled area marker: under the optics, as in the app's use
    default:
      return layers.annotations;
  }
}

const zOf = (item) => (typeof item.z_value === 'number' ? item.z_value : 0);

function drawAll() {
  for (const layer of Object.values(layers)) layer.replaceChildren();
  nodes.clear();
  // z_value orders items within a layer, as in the app (stable for equal values).
  const sorted = [...scene.items.entries()].sort((a, b) => zOf(a[1]) - zOf(b[1]));
  for (const [uuid, item] of sorted) {
    if (itemType(item) === 'path_measure') continue;
    const g = drawItem(uuid, item);
    nodes.set(uuid, g);
    layerOf(item).append(g);
  }
}

function drawChanged(uuids) {
  for (const uuid of uuids) {
    const item = scene.items.get(uuid);
    const old = nodes.get(uuid);
    if (!item || itemType(item) === 'path_measure') {
      if (old && old.dataset.type !== 'path_measure') old.remove();
      if (!item) nodes.delete(uuid);
      continue;
    }
    const g = drawItem(uuid, item);
    nodes.set(uuid, g);
    if (old && old.parentNode === layerOf(item)) old.replaceWith(g);
    else {
      old?.remove();
      layerOf(item).append(g);
    }
  }
}

function drawRays(changed, all) {
  const t0 = performance.now();
  let paths = [];
  if ($('rays').checked) paths = rays.update(scene.items, changed, all);
  else rays.clear();
  stats.lastTraceMs = performance.now() - t0;
  stats.lastTracedSources = rays.traced;
  // Path measures follow the rays they measure.
  const measures = [];
  for (const [uuid, item] of scene.items) {
    if (itemType(item) !== 'path_measure') continue;
    const g = drawPathMeasure(uuid, item, paths);
    nodes.set(uuid, g);
    measures.push(g);
  }
  layers.measures.replaceChildren(...measures);
}

/** Items and the rays they send, as the app's fit (its scene's bounding rect) shows them. */
function fitToBench() {
  const rayPoints = [...rays.sources.values()].flatMap((s) => s.paths.flatMap((p) => p.points));
  viewport.fit([...scene.items.values()].flatMap(outline).concat(rayPoints));
}

function render() {
  frame = 0;
  const t0 = performance.now();
  const wasWhole = whole;
  if (whole) drawAll();
  else drawChanged(dirty);
  drawRays(dirty, whole);
  if (!fitted && scene.items.size > 0) {
    fitToBench();
    fitted = true;
  }
  const ms = performance.now() - t0;
  stats.renders += 1;
  stats.lastRenderMs = ms;
  stats.recent?.push(ms); // set by the browser test while it measures a drag
  if (wasWhole) stats.fullRenders.push({ items: scene.items.size, ms, traceMs: stats.lastTraceMs });
  whole = false;
  dirty = new Set();
  svg.dataset.items = String(scene.items.size);
  svg.dataset.renders = String(stats.renders);
  $('count').textContent = `${scene.items.size} item${scene.items.size === 1 ? '' : 's'}`;
}

function schedule() {
  if (!frame) frame = requestAnimationFrame(render);
}

scene.addEventListener('change', ({ detail }) => {
  if (detail.whole) whole = true;
  for (const uuid of detail.uuids) dirty.add(uuid);
  schedule();
});

// --- the connection ---------------------------------------------------------------------
const STATUS_TEXT = {
  connecting: 'connecting…',
  live: 'live',
  retrying: 'reconnecting…',
  closed: 'disconnected',
};
link.addEventListener('status', ({ detail }) => {
  live = detail.state === 'live';
  document.body.dataset.link = detail.state;
  let text = STATUS_TEXT[detail.state] ?? detail.state;
  if (detail.state === 'closed' && detail.code === 4000) text = 'replaced by another tab';
  $('status').textContent = text;
  $('status').className = `status ${detail.state}`;
});
link.addEventListener('ack', ({ detail }) => people.reset(detail.users, detail.user));
link.addEventListener('joined', ({ detail }) => people.joined(detail.user));
link.addEventListener('left', ({ detail }) => people.left(detail.user));
link.addEventListener('fullstate', ({ detail }) => scene.replaceAll(detail.items, detail.version));
link.addEventListener('command', ({ detail }) => scene.apply(detail));
link.addEventListener('error', ({ detail }) => {
  $('status').textContent = `server refused: ${detail.message ?? detail.code}`;
});

// --- the page ---------------------------------------------------------------------------
document.title = `${session} · Optiverse bench`;
$('session').textContent = session;
$('session').href = viewUrl(session);
$('me').textContent = user;
// Read-only on or off: join again under the name that says so (the others see the old name
// leave and the new one join), and keep the choice in the address for a reload or a link.
$('readonly').addEventListener('change', () => {
  const watching = $('readonly').checked;
  user = nameFor(watching);
  $('me').textContent = user;
  const url = new URL(location.href);
  if (watching) url.searchParams.set('watch', '1');
  else url.searchParams.delete('watch');
  history.replaceState(null, '', url);
  link.reconnectAs(user);
});
$('fit').addEventListener('click', fitToBench);
$('rays').addEventListener('change', () => {
  whole = true; // rays on again: trace everything
  schedule();
});

// The name on hover (the SVG <title> also gives the browser's own tooltip).
const hover = $('hover');
svg.addEventListener('pointerover', (event) => {
  const node = event.target.closest?.('.item');
  const item = node && scene.items.get(node.dataset.uuid);
  if (!item) return;
  hover.textContent = describe(item);
  hover.hidden = false;
});
svg.addEventListener('pointerout', (event) => {
  if (event.target.closest?.('.item')) hover.hidden = true;
});
svg.addEventListener('pointermove', (event) => {
  hover.style.left = `${event.clientX + 14}px`;
  hover.style.top = `${event.clientY + 12}px`;
  const [x, y] = viewport.toWorld(event.clientX, event.clientY);
  $('cursor').textContent = `${x.toFixed(1)}, ${y.toFixed(1)} mm`;
});

if (session) link.start();
else $('status').textContent = 'no session in the address';

export { dragging, link, scene, viewport };
