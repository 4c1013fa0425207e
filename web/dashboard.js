// The sessions dashboard, `/`: polls what the server already serves (every POLL_MS):
// `/api/sessions` (the sessions in memory), `/health` (connections, version), `/metrics`
// (updates applied, for a rate) and `/api/process` (resident memory).

import { getJson, httpUrl, viewUrl } from './base.js';

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

/** Per session: the last document size and item count seen, and when they last changed. */
const seen = new Map();
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

function ago(ms) {
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 2) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return new Date(ms).toLocaleTimeString();
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

function renderSessions(list) {
  const now = Date.now();
  const rows = list.map((s) => {
    const before = seen.get(s.id);
    const fingerprint = `${s.document_bytes}/${s.item_count}`;
    if (!before) seen.set(s.id, { fingerprint, changed: null });
    else if (before.fingerprint !== fingerprint) seen.set(s.id, { fingerprint, changed: now });
    const { changed } = seen.get(s.id);

    const tr = document.createElement('tr');
    tr.dataset.session = s.id;
    const name = document.createElement('td');
    const link = document.createElement('a');
    link.href = viewUrl(s.id);
    link.textContent = s.id;
    name.append(link);
    tr.append(
      name,
      cell(s.users.length ? s.users.join(', ') : '—'),
      cell(String(s.connections), 'num'),
      cell(String(s.item_count), 'num'),
      cell(bytes(s.document_bytes), 'num'),
      cell(changed ? ago(changed) : 'not since this page opened'),
    );
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell('No session in memory. A session appears when someone connects to it.', 'empty');
    td.colSpan = 6;
    tr.append(td);
    rows.push(tr);
  }
  $('rows').replaceChildren(...rows);
  $('sessions').textContent = String(list.length);
}

async function poll() {
  try {
    const [sessions, health, metrics, process] = await Promise.all([
      getJson('api/sessions'),
      getJson('health'),
      fetch(httpUrl('metrics'), { cache: 'no-store' }).then((r) => r.text()),
      getJson('api/process'),
    ]);
    renderSessions(sessions);
    $('connections').textContent = String(health.connections);
    $('version').textContent = `optiverse-collab ${health.version}`;
    $('rss').textContent = bytes(process.rss_bytes);
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
