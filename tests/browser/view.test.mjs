// The live bench view in real Chromium (Debian's, headless), against a running server.
// Run by tests/browser.rs, which starts the server and passes:
//   BASE_URL     http://127.0.0.1:PORT
//   FIXTURES     the folder of *.scene.json fixtures (../shared/fixtures)
//   OUT_DIR      where screenshots and measurements.json go (target/screenshots)
//   CHROMIUM     the browser binary (default /usr/bin/chromium)
//   STORED_ONLY  a session in the server's store but not in memory, with STORED_ONLY_ITEMS items
// Every wait has a deadline; nothing sleeps. Timings are measured and printed, never asserted.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { chromium } from 'playwright-core';

import { DesktopClient } from './desktop-client.mjs';
import { DESKTOP_INTERFACES, expectedPoints, typeOf } from './geometry.mjs';

const BASE = process.env.BASE_URL;
const FIXTURES = process.env.FIXTURES;
const OUT_DIR = process.env.OUT_DIR;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const STORED_ONLY = process.env.STORED_ONLY;
const STORED_ONLY_ITEMS = Number(process.env.STORED_ONLY_ITEMS);
assert.ok(BASE && FIXTURES && OUT_DIR && STORED_ONLY && STORED_ONLY_ITEMS > 0,
  'BASE_URL, FIXTURES, OUT_DIR, STORED_ONLY and STORED_ONLY_ITEMS are required');

const DEADLINE_MS = 20_000; // a broken page fails after this; never what a test asserts
const PX_TOLERANCE = 0.75; // screen pixels between where an item is drawn and where it should be
const SCREEN = { width: 1280, height: 800 };

const measurements = {};
const log = (...args) => console.log(...args);
let passed = 0;
let failed = 0;

async function check(name, body) {
  const t0 = performance.now();
  try {
    await body();
    passed += 1;
    log(`ok   ${name} (${Math.round(performance.now() - t0)} ms)`);
  } catch (error) {
    failed += 1;
    log(`FAIL ${name}\n${error.stack ?? error}`);
  }
}

function loadFixture(name) {
  const scene = JSON.parse(readFileSync(join(FIXTURES, `${name}.scene.json`), 'utf8'));
  return scene.items;
}

/** Puts items into a fresh session as a desktop host does, and leaves. */
async function seed(session, items) {
  const host = await DesktopClient.join(BASE, session, 'seeder');
  await host.upload(items);
  await host.close();
}

async function sceneOf(session) {
  const response = await fetch(`${BASE}/api/sessions/${encodeURIComponent(session)}/scene`);
  assert.equal(response.status, 200);
  return (await response.json()).items;
}

async function openView(context, session, expectedCount) {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => m.type() === 'error' && errors.push(m.text()));
  const t0 = performance.now();
  await page.goto(`${BASE}/s/${encodeURIComponent(session)}`);
  await page.waitForFunction(
    (n) => document.querySelector('#bench')?.dataset.items === String(n),
    expectedCount,
    { timeout: DEADLINE_MS, polling: 'raf' },
  );
  const openMs = performance.now() - t0;
  return { page, errors, openMs };
}

/** Where the page drew each named point of an item, in screen pixels (see expectedPoints). */
function drawnPoints(page, uuid) {
  return page.evaluate((id) => {
    const g = document.querySelector(`.item[data-uuid="${CSS.escape(id)}"]`);
    if (!g) return null;
    const screen = (node, x, y) => {
      const m = node.getScreenCTM();
      return [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f];
    };
    const out = {};
    const n = (node, attr) => Number(node.getAttribute(attr));
    switch (g.dataset.type) {
      case 'component':
        g.querySelectorAll('line.hit').forEach((line, i) => {
          out[`iface${i}.a`] = screen(line, n(line, 'x1'), n(line, 'y1'));
          out[`iface${i}.b`] = screen(line, n(line, 'x2'), n(line, 'y2'));
        });
        break;
      case 'source': {
        const bar = g.querySelector('.source-bar');
        out.origin = screen(bar, (n(bar, 'x1') + n(bar, 'x2')) / 2, (n(bar, 'y1') + n(bar, 'y2')) / 2);
        const arrow = g.querySelector('.source-arrow');
        out.arrow = screen(arrow, n(arrow, 'x2'), n(arrow, 'y2'));
        break;
      }
      case 'ruler': {
        const line = g.querySelector('polyline.ruler');
        [...line.points].forEach((p, i) => { out[`point${i}`] = screen(line, p.x, p.y); });
        break;
      }
      case 'text':
        out.origin = screen(g, 0, 0);
        break;
      case 'rectangle': {
        const r = g.querySelector('rect');
        const [x, y, w, h] = ['x', 'y', 'width', 'height'].map((a) => n(r, a));
        [[x, y], [x + w, y], [x + w, y + h], [x, y + h]].forEach((c, i) => {
          out[`corner${i}`] = screen(r, c[0], c[1]);
        });
        break;
      }
      default:
        break;
    }
    return out;
  }, uuid);
}

/** World millimetres to screen pixels, through the page's camera (its pan and zoom). */
function toScreen(page, points) {
  return page.evaluate((list) => {
    const m = document.getElementById('camera').getScreenCTM();
    return list.map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
  }, points);
}

/** Every item of the document is drawn where its data says, and inside the view. */
async function assertDrawnAsDocument(page, items) {
  const box = await page.evaluate(() => {
    const r = document.getElementById('bench').getBoundingClientRect();
    return { left: r.left, top: r.top, right: r.right, bottom: r.bottom };
  });
  for (const item of items) {
    const uuid = item.uuid ?? item.item_uuid;
    const expected = expectedPoints(item);
    const names = Object.keys(expected);
    const drawn = await drawnPoints(page, uuid);
    assert.ok(drawn, `item ${uuid} (${typeOf(item)}) is not drawn`);
    if (names.length === 0) continue;
    assert.deepEqual(Object.keys(drawn).sort(), names.sort(), `parts of ${typeOf(item)} ${uuid}`);
    const want = await toScreen(page, names.map((k) => expected[k]));
    names.forEach((k, i) => {
      const [dx, dy] = [drawn[k][0] - want[i][0], drawn[k][1] - want[i][1]];
      assert.ok(
        Math.hypot(dx, dy) <= PX_TOLERANCE,
        `${typeOf(item)} ${item.name ?? uuid} ${k}: drawn at ${drawn[k]}, document says ${want[i]}`,
      );
      assert.ok(
        want[i][0] >= box.left - 1 && want[i][0] <= box.right + 1
          && want[i][1] >= box.top - 1 && want[i][1] <= box.bottom + 1,
        `${typeOf(item)} ${uuid} ${k} is outside the view after "fit to bench"`,
      );
    });
  }
}

/** Waits until the page draws an item placed at `x` (its group's translation, in mm). */
function waitForX(page, uuid, x) {
  return page.waitForFunction(
    ([id, want]) => {
      const transform = document.querySelector(`.item[data-uuid="${id}"]`)?.getAttribute('transform');
      const match = /^translate\(([-0-9.e]+) /.exec(transform ?? '');
      return match !== null && Math.abs(Number(match[1]) - want) < 0.002;
    },
    [uuid, x],
    { timeout: DEADLINE_MS, polling: 'raf' },
  );
}

/** The screen centre of an item's first drawn part, where a mouse can grab it. */
async function grabPoint(page, uuid) {
  return page.evaluate((id) => {
    const g = document.querySelector(`.item[data-uuid="${CSS.escape(id)}"]`);
    const hit = g.querySelector('.hit');
    const m = hit.getScreenCTM();
    const [x1, y1, x2, y2] = ['x1', 'y1', 'x2', 'y2'].map((a) => Number(hit.getAttribute(a)));
    const [x, y] = [(x1 + x2) / 2, (y1 + y2) / 2];
    const p = [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f];
    const top = document.elementFromPoint(p[0], p[1])?.closest('.item');
    return { x: p[0], y: p[1], grabbable: top === g };
  }, uuid);
}

const percentile = (values, q) => {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
};
const round = (v, digits = 1) => (v == null ? null : Math.round(v * 10 ** digits) / 10 ** digits);

/** Starts recording animation-frame intervals in the page. */
function recordFrames(page) {
  return page.evaluate(() => {
    window.frameTimes = [];
    window.recordingFrames = true;
    const tick = (t) => {
      window.frameTimes.push(t);
      if (window.recordingFrames) requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
    window.benchStats.recent = [];
  });
}

async function stopFrames(page) {
  const { times, renders } = await page.evaluate(() => {
    window.recordingFrames = false;
    return { times: window.frameTimes, renders: window.benchStats.recent };
  });
  const intervals = times.slice(1).map((t, i) => t - times[i]);
  return {
    frames: intervals.length,
    frame_interval_ms_p50: round(percentile(intervals, 0.5)),
    frame_interval_ms_p95: round(percentile(intervals, 0.95)),
    frame_interval_ms_max: round(Math.max(...intervals)),
    frames_over_50ms: intervals.filter((v) => v > 50).length,
    render_ms_p50: round(percentile(renders, 0.5)),
    render_ms_p95: round(percentile(renders, 0.95)),
  };
}

/** A scene of `count` items: the fixtures repeated on a grid with new uuids. */
function bigScene(count) {
  const names = readdirSync(FIXTURES).filter((f) => f.endsWith('.scene.json')).sort();
  const templates = names.map((f) => JSON.parse(readFileSync(join(FIXTURES, f), 'utf8')).items);
  const items = [];
  for (let copy = 0; items.length < count; copy += 1) {
    const template = templates[copy % templates.length];
    const [dx, dy] = [(copy % 16) * 700, Math.floor(copy / 16) * 300];
    for (const item of template) {
      if (items.length === count) break;
      items.push({
        ...structuredClone(item),
        item_uuid: `big-${copy}-${item.item_uuid}`,
        x_mm: item.x_mm + dx,
        y_mm: item.y_mm + dy,
      });
    }
  }
  return items;
}

// ----------------------------------------------------------------------------------------------
mkdirSync(OUT_DIR, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), 'collab-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: SCREEN,
  // Without the background-networking flags Chromium tries to reach its services at start,
  // which this closed network refuses (and which would slow every start).
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});

try {
  const fixtureNames = readdirSync(FIXTURES)
    .filter((f) => f.endsWith('.scene.json'))
    .map((f) => f.replace('.scene.json', ''))
    .sort();
  assert.ok(fixtureNames.length >= 2, 'at least two fixtures');

  await check('the expected geometry matches what the desktop app computed', async () => {
    for (const [fixture, components] of Object.entries(DESKTOP_INTERFACES)) {
      const items = loadFixture(fixture);
      for (const [label, [a, b]] of components) {
        const item = items.find((i) => (i.notes ?? '').endsWith(` as ${label}`));
        const points = expectedPoints(item);
        for (const [got, want] of [[points['iface0.a'], a], [points['iface0.b'], b]]) {
          assert.ok(Math.hypot(got[0] - want[0], got[1] - want[1]) < 0.01, `${fixture} ${label}: ${got} vs ${want}`);
        }
      }
    }
  });

  for (const name of fixtureNames) {
    await check(`fixture ${name}: every item drawn where the document says; screenshot`, async () => {
      const session = `fixture-${name}`;
      await seed(session, loadFixture(name));
      const items = await sceneOf(session);
      const { page, errors } = await openView(context, session, items.length);
      await assertDrawnAsDocument(page, items);
      const rays = await page.locator('#layer-rays polyline').count();
      assert.ok(rays >= 1, 'the sources\' rays are drawn');
      await page.screenshot({ path: join(OUT_DIR, `${name}.png`) });
      assert.deepEqual(errors, [], 'no script errors');
      await page.close();
    });
  }

  await check('the 4f telescope\'s rays cross at the shared focus', async () => {
    const { page } = await openView(context, 'fixture-four_f_telescope', 3);
    const crossings = await page.evaluate(() => [...document.querySelectorAll('#layer-rays polyline')].map((line) => {
      const pts = [...line.points];
      for (let i = 1; i < pts.length; i += 1) {
        const [p, q] = [pts[i - 1], pts[i]];
        if ((p.x - 200) * (q.x - 200) <= 0 && p.x !== q.x) return p.y + ((200 - p.x) * (q.y - p.y)) / (q.x - p.x);
      }
      return null;
    }));
    assert.equal(crossings.length, 7, 'seven rays');
    for (const y of crossings) assert.ok(y !== null && Math.abs(y) < 0.05, `a ray crosses x = 200 mm at y = ${y}`);
    await page.close();
  });

  await check('annotations: ruler, text note, rectangle and path measure drawn from their data', async () => {
    const session = 'annotated-mach-zehnder';
    const items = [
      ...loadFixture('mach_zehnder_skeleton'),
      { _type: 'ruler', item_uuid: 'ann-ruler', points: [[0, -45], [213, -45]], z_value: 1 },
      { _type: 'text', item_uuid: 'ann-text', text: 'Mach-Zehnder skeleton', x: 10, y: 150, color: '#0a0a28', point_size: 8 },
      { _type: 'rectangle', item_uuid: 'ann-rect', x: 160, y: 40, width_mm: 150, height_mm: 110, angle_deg: 0, z_value: -1 },
      { _type: 'path_measure', item_uuid: 'ann-path', ray_index: 0, start_param: 0, end_param: 0.25, label_prefix: 'arm' },
    ];
    await seed(session, items);
    const stored = await sceneOf(session);
    const { page, errors } = await openView(context, session, stored.length);
    await assertDrawnAsDocument(page, stored);
    assert.equal(await page.locator('.item[data-uuid="ann-path"] polyline.path-measure').count(), 1);
    await page.screenshot({ path: join(OUT_DIR, 'annotated_mach_zehnder.png') });
    assert.deepEqual(errors, []);
    await page.close();
  });

  await check('a move by a desktop client moves the drawing; joiners and leavers show live', async () => {
    const session = 'fixture-mach_zehnder_skeleton';
    const { page, errors } = await openView(context, session, 4);
    const me = await page.locator('#me').textContent();
    await page.waitForSelector(`#people li[data-user="${me}"]`, { timeout: DEADLINE_MS });

    const mover = await DesktopClient.join(BASE, session, 'mover');
    await page.waitForSelector('#people li[data-user="mover"]', { timeout: DEADLINE_MS });
    const items = await mover.fullState();
    const splitter = items.find((i) => i.name?.startsWith('Standard Beamsplitter'));
    const moved = { ...splitter, x_mm: splitter.x_mm + 40, y_mm: splitter.y_mm - 25, angle_deg: 45 };
    delete moved.uuid;
    delete moved.item_type;
    const latencies = [];
    for (let step = 0; step < 5; step += 1) {
      const data = { ...moved, x_mm: moved.x_mm + step * 3 };
      const t0 = performance.now();
      await mover.command('move_item', 'component', splitter.uuid, data);
      await mover.command('update_item', 'component', splitter.uuid, data);
      await waitForX(page, splitter.uuid, data.x_mm);
      latencies.push(performance.now() - t0);
      await assertDrawnAsDocument(page, [{ ...data, item_type: 'component', uuid: splitter.uuid }]);
    }
    measurements.remote_move_to_drawn_ms = latencies.map((v) => round(v));

    const ada = await DesktopClient.join(BASE, session, 'ada');
    await page.waitForSelector('#people li[data-user="ada"]', { timeout: DEADLINE_MS });
    await ada.close();
    await page.waitForSelector('#people li[data-user="ada"]', { state: 'detached', timeout: DEADLINE_MS });
    await mover.close();
    await page.waitForSelector('#people li[data-user="mover"]', { state: 'detached', timeout: DEADLINE_MS });
    assert.deepEqual(errors, []);
    await page.close();
  });

  await check('dragging an item in the page moves it for a desktop client', async () => {
    const session = 'fixture-single_lens_focus';
    const { page, errors } = await openView(context, session, 2);
    const watcher = await DesktopClient.join(BASE, session, 'watcher');
    const items = await watcher.fullState();
    const lens = items.find((i) => typeOf(i) === 'component');
    const k = await page.evaluate(() => document.getElementById('camera').getScreenCTM().a);
    const from = await grabPoint(page, lens.uuid);
    assert.ok(from.grabbable, 'the lens is on top where it is grabbed');
    const since = watcher.received.length;
    await page.mouse.move(from.x, from.y);
    await page.mouse.down();
    for (let i = 1; i <= 10; i += 1) await page.mouse.move(from.x + 6 * i, from.y);
    await page.mouse.up();
    const wantX = lens.x_mm + 60 / k;
    const update = await watcher.waitFor(
      (m) => m.type === 'command' && m.command.action === 'update_item' && m.command.item_id === lens.uuid
        && Math.abs(m.command.data.x_mm - wantX) < 1e-6,
      'the dragged lens at its final place', since,
    );
    assert.equal(update.user_id, await page.locator('#me').textContent());
    assert.equal(update.command.data.y_mm, lens.y_mm);
    await watcher.barrier();
    const stored = (await sceneOf(session)).find((i) => i.uuid === lens.uuid);
    assert.ok(Math.abs(stored.x_mm - wantX) < 1e-6, `the document has the lens at ${stored.x_mm}, want ${wantX}`);
    await watcher.close();
    assert.deepEqual(errors, []);
    await page.close();
  });

  await check('a read-only page joins as a watcher, moves nothing, and joins again as a browser when switched', async () => {
    const session = 'fixture-two_mirror_steering';
    const observer = await DesktopClient.join(BASE, session, 'observer');
    const before = await observer.fullState();
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`${BASE}/s/${session}?watch=1`);
    await page.waitForFunction(() => document.querySelector('#bench')?.dataset.items === '3', null, { timeout: DEADLINE_MS });
    const watching = await page.locator('#me').textContent();
    assert.match(watching, /^watching-[0-9a-f]{4}$/);
    assert.equal(await page.locator('#readonly').isChecked(), true);
    await observer.waitFor((m) => m.type === 'user:joined' && m.user_id === watching, `user:joined ${watching}`);
    assert.equal(await page.locator(`#people li[data-user="${watching}"] .tag`).textContent(), 'you, watching');

    // A drag does nothing while read-only.
    const mirror = before.find((i) => typeOf(i) === 'component');
    const from = await grabPoint(page, mirror.uuid);
    assert.ok(from.grabbable, 'the mirror is on top where it is grabbed');
    await page.mouse.move(from.x, from.y);
    await page.mouse.down();
    for (let i = 1; i <= 5; i += 1) await page.mouse.move(from.x + 10 * i, from.y);
    await page.mouse.up();

    // Switched off: the page leaves and joins again under a browser- name. Its old connection
    // closes after anything it sent, so once the observer hears it leave, a command it sent
    // would have arrived.
    await page.locator('#readonly').uncheck();
    await observer.waitFor((m) => m.type === 'user:left' && m.user_id === watching, `user:left ${watching}`);
    const browser = await page.locator('#me').textContent();
    assert.equal(browser, watching.replace('watching-', 'browser-'));
    await observer.waitFor((m) => m.type === 'user:joined' && m.user_id === browser, `user:joined ${browser}`);
    assert.ok(!page.url().includes('watch='), 'the address no longer asks to watch');
    // (The observer's full state was followed by the server's own update_items: not the page's.)
    const fromPage = observer.received.filter((m) => m.type === 'command' && [watching, browser].includes(m.user_id));
    assert.deepEqual(fromPage, [], 'a read-only page sent nothing');
    await observer.barrier();
    const after = (await sceneOf(session)).find((i) => i.uuid === mirror.uuid);
    assert.equal(after.x_mm, mirror.x_mm, 'the mirror did not move');
    await page.waitForSelector(`#people li[data-user="${browser}"]`, { timeout: DEADLINE_MS });
    await page.waitForSelector('#people li[data-user="observer"]', { timeout: DEADLINE_MS });
    assert.equal(await page.locator(`#people li[data-user="${watching}"]`).count(), 0);
    await observer.close();
    assert.deepEqual(errors, []);
    await page.close();
  });

  await check('measured: a 1,000-item bench renders; drags stay smooth', async () => {
    const session = 'big-1000';
    await seed(session, bigScene(1000));
    const { page, errors, openMs } = await openView(context, session, 1000);
    const first = await page.evaluate(() => window.benchStats.fullRenders[0]);
    measurements.big_scene = {
      items: 1000,
      open_to_drawn_ms: round(openMs),
      first_render_ms: round(first.ms),
      of_which_ray_trace_ms: round(first.traceMs),
      rays_drawn: await page.locator('#layer-rays polyline').count(),
      svg_elements: await page.evaluate(() => document.querySelectorAll('#camera *').length),
    };
    await page.screenshot({ path: join(OUT_DIR, 'big_1000.png') });

    // A local drag: the mouse moves 60 times; the page redraws the item and re-traces.
    const lensUuid = await page.evaluate(() => {
      const all = [...document.querySelectorAll('#layer-components .item')];
      const box = document.getElementById('bench').getBoundingClientRect();
      const visible = all.find((g) => {
        const r = g.getBoundingClientRect();
        return r.left > box.left + 100 && r.right < box.right - 200 && r.top > box.top + 100 && r.bottom < box.bottom - 100;
      });
      return visible.dataset.uuid;
    });
    const at = await grabPoint(page, lensUuid);
    await recordFrames(page);
    await page.mouse.move(at.x, at.y);
    await page.mouse.down();
    for (let i = 1; i <= 60; i += 1) await page.mouse.move(at.x + i * 2, at.y + i);
    await page.mouse.up();
    measurements.local_drag_1000 = { mouse_moves: 60, ...(await stopFrames(page)) };

    // A remote drag: a desktop client drags a component in 60 steps (move_item + update_item
    // each, as the app sends them); each step is sent once the page has drawn the previous one.
    const dragger = await DesktopClient.join(BASE, session, 'dragger');
    const items = await dragger.fullState();
    const item = items.find((i) => typeOf(i) === 'component');
    await recordFrames(page);
    const stepMs = [];
    for (let i = 1; i <= 60; i += 1) {
      const data = { ...item, x_mm: item.x_mm + i * 0.5 };
      delete data.uuid;
      delete data.item_type;
      const t0 = performance.now();
      await dragger.command('move_item', 'component', item.uuid, data);
      await dragger.command('update_item', 'component', item.uuid, data);
      await waitForX(page, item.uuid, data.x_mm);
      stepMs.push(performance.now() - t0);
    }
    measurements.remote_drag_1000 = {
      steps: 60,
      step_sent_to_drawn_ms_p50: round(percentile(stepMs, 0.5)),
      step_sent_to_drawn_ms_p95: round(percentile(stepMs, 0.95)),
      step_sent_to_drawn_ms_max: round(Math.max(...stepMs)),
      ...(await stopFrames(page)),
    };
    await dragger.close();
    assert.deepEqual(errors, []);
    await page.close();
  });

  await check('the dashboard lists the sessions with people and items, and links to the view', async () => {
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`${BASE}/`);
    const row = page.locator('tr[data-session="fixture-mach_zehnder_skeleton"]');
    await row.waitFor({ timeout: DEADLINE_MS });
    const viewer = await DesktopClient.join(BASE, 'fixture-mach_zehnder_skeleton', 'lab-lead');
    await page.waitForFunction(
      () => document.querySelector('tr[data-session="fixture-mach_zehnder_skeleton"]')?.textContent.includes('lab-lead'),
      null,
      { timeout: DEADLINE_MS },
    );
    const cells = await row.locator('td').allTextContents();
    assert.equal(cells[0], 'fixture-mach_zehnder_skeleton');
    assert.equal(cells[3], '4', 'items');
    await page.waitForFunction(() => document.getElementById('rss').textContent.includes('iB'), null, { timeout: DEADLINE_MS });
    await page.waitForFunction(() => document.getElementById('rate').textContent !== '–', null, { timeout: DEADLINE_MS });
    // The views of the checks above have closed; only lab-lead's connection is left.
    await page.waitForFunction(() => document.getElementById('connections').textContent === '1', null, { timeout: DEADLINE_MS });
    // A change shows as the session's last change, and in the update rate.
    const [item] = await viewer.fullState();
    const data = { ...item, x_mm: item.x_mm + 1 };
    delete data.uuid;
    delete data.item_type;
    await viewer.command('update_item', item.item_type, item.uuid, data);
    await page.waitForFunction(
      () => document.querySelector('tr[data-session="fixture-mach_zehnder_skeleton"] td:last-child')?.textContent === 'just now',
      null,
      { timeout: DEADLINE_MS },
    );
    await page.screenshot({ path: join(OUT_DIR, 'dashboard.png') });
    await row.locator('a').click();
    await page.waitForFunction(() => document.querySelector('#bench')?.dataset.items === '4', null, { timeout: DEADLINE_MS });
    await viewer.close();
    assert.deepEqual(errors, []);
    await page.close();
  });
  await check('a session only in the store is listed without being loaded, and opens from its link', async () => {
    const loadedIds = async () => (await (await fetch(`${BASE}/api/sessions`)).json()).map((s) => s.id);
    assert.ok(!(await loadedIds()).includes(STORED_ONLY), 'not in memory before');
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`${BASE}/`);
    const selector = `tr[data-session="${STORED_ONLY}"]`;
    await page.waitForSelector(`${selector}[data-loaded="false"]`, { timeout: DEADLINE_MS });
    const cells = await page.locator(`${selector} td`).allTextContents();
    assert.equal(cells[0], STORED_ONLY);
    assert.equal(cells[3], '—', 'items unknown until loaded');
    assert.match(cells[4], /^[0-9.]+ (B|KiB|MiB) stored$/);
    assert.equal(cells[5], 'store only');
    assert.match(cells[6], /ago|just now/, 'the last change the store recorded');
    assert.match(await page.locator('#stored').textContent(), /^of [0-9]+ stored$/);
    // Several polls later it is still not loaded: listing does not load.
    const polls = Number(await page.evaluate(() => document.body.dataset.polls));
    await page.waitForFunction((n) => Number(document.body.dataset.polls) >= n + 2, polls, { timeout: DEADLINE_MS });
    assert.ok(!(await loadedIds()).includes(STORED_ONLY), 'the dashboard loaded the session');
    await page.screenshot({ path: join(OUT_DIR, 'dashboard_stored.png') });

    await page.locator(`${selector} a`).click();
    await page.waitForFunction(
      (n) => document.querySelector('#bench')?.dataset.items === String(n),
      STORED_ONLY_ITEMS,
      { timeout: DEADLINE_MS },
    );
    await page.goBack();
    await page.waitForSelector(`${selector}[data-loaded="true"]`, { timeout: DEADLINE_MS });
    const loaded = await page.locator(`${selector} td`).allTextContents();
    assert.equal(loaded[3], String(STORED_ONLY_ITEMS));
    assert.equal(loaded[5], 'memory, store');
    assert.deepEqual(errors, []);
    await page.close();
  });
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}

writeFileSync(join(OUT_DIR, 'measurements.json'), `${JSON.stringify(measurements, null, 2)}\n`);
log(`measurements: ${JSON.stringify(measurements)}`);
log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
