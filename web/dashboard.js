// The sessions dashboard, `/`: polls what the server already serves (every POLL_MS):
// `/api/sessions` (the sessions in memory), `/api/store/sessions` (every stored session, loaded
// or not, with its last change), `/health` (connections, version), `/metrics` (updates
// applied, for a rate) and `/api/process` (resident memory, the memory budget's use).

import { getJson, httpUrl, viewUrl } from './base.js';

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

let lastUpdates = null;

function bytes(n) {
  if (n == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** How long before the server's `now` a stored time was (both RFC 3339, the server's clock). */
function ago(then, now) {
  const s = Math.round((Date.parse(now) - Date.parse(then)) / 1000);
  if (!Number.isFinite(s)) return '–';
  if (s < 2) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(then).toLocaleString();
}

/** The sum of a Prometheus counter's samples (all label sets), or null if absent. */
function counter(text, name) {
  let total = null;
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || !line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    const value = Number(rest.trim().split(/\s+/).at(-1));
    if (Number.isFinite(value)) total = (total ?? 0) + value;
  }
  return total;
}

function cell(text, className) {
  const td = document.createElement('td');
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

/**
 * One row per session, in memory or stored: what is in memory comes from the session itself
 * (people, items, its document encoded now); a session only in the store is not loaded to be
 * shown (its stored bytes stand for its size, its items are unknown until someone opens it).
 */
function renderSessions(loaded, store) {
  const stored = new Map(store.sessions.map((s) => [s.id, s]));
  const inMemory = new Map(loaded.map((s) => [s.id, s]));
  const ids = [...new Set([...inMemory.keys(), ...stored.keys()])].sort();
  const rows = ids.map((id) => {
    const live = inMemory.get(id);
    const kept = stored.get(id);
    const tr = document.createElement('tr');
    tr.dataset.session = id;
    tr.dataset.loaded = String(Boolean(live));
    if (!live) tr.className = 'unloaded';
    const name = document.createElement('td');
    const link = document.createElement('a');
    link.href = viewUrl(id);
    link.textContent = id;
    name.append(link);
    const size = live
      ? bytes(live.document_bytes)
      : `${bytes(kept.stored_bytes)} stored`;
    tr.append(
      name,
      cell(live?.users.length ? live.users.join(', ') : '—'),
      cell(String(live?.connections ?? 0), 'num'),
      cell(live ? String(live.item_count) : '—', 'num'),
      cell(size, 'num'),
      cell(live ? (kept ? 'memory, store' : 'memory') : 'store only'),
      cell(kept?.last_change ? ago(kept.last_change, store.now) : '—'),
    );
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell('No session yet. A session appears when someone connects to it.', 'empty');
    td.colSpan = 7;
    tr.append(td);
    rows.push(tr);
  }
  $('rows').replaceChildren(...rows);
  $('sessions').textContent = String(loaded.length);
  $('stored').textContent = `of ${store.sessions.length} stored`;
}

async function poll() {
  try {
    const [sessions, store, health, metrics, process] = await Promise.all([
      getJson('api/sessions'),
      getJson('api/store/sessions'),
      getJson('health'),
      fetch(httpUrl('metrics'), { cache: 'no-store' }).then((r) => r.text()),
      getJson('api/process'),
    ]);
    renderSessions(sessions, store);
    $('connections').textContent = String(health.connections);
    $('version').textContent = `optiverse-collab ${health.version}`;
    $('rss').textContent = bytes(process.rss_bytes);
    const budget = process.budget;
    $('rss-sub').textContent = budget
      ? `resident set; budget ${bytes(budget.used_bytes)} of ${bytes(budget.limit_bytes)} held`
      : 'resident set';
    const updates = counter(metrics, 'collab_updates_applied_total') ?? 0;
    const now = performance.now();
    if (lastUpdates) {
      const rate = (updates - lastUpdates.value) / ((now - lastUpdates.at) / 1000);
      $('rate').textContent = rate.toFixed(rate < 10 ? 1 : 0);
    }
    lastUpdates = { value: updates, at: now };
    $('status').textContent = 'live';
    $('status').className = 'status live';
  } catch (error) {
    $('status').textContent = `unreachable (${error.message})`;
    $('status').className = 'status closed';
  } finally {
    document.body.dataset.polls = String(Number(document.body.dataset.polls ?? 0) + 1);
    setTimeout(poll, POLL_MS);
  }
}

poll();
