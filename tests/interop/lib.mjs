// Shared helpers of the interop scripts: argument parsing, providers against the server under
// test, event-driven waits with a bound, JSON normalisation, and a `main` wrapper that always
// terminates the process with a clear verdict.
//
// Every wait resolves on an event (a document update, a provider's sync, an awareness change);
// the bound only keeps a broken run from hanging and is reported as a failure.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

/** Bound on one awaited event. */
export const WAIT_MS = 20_000
/** Bound on a whole script. */
export const OVERALL_MS = 120_000

const providers = new Set()

/**
 * Parses `node SCRIPT.mjs ws://HOST:PORT SESSION [extra...]`.
 * @param {string} script
 * @param {string[]} extra names of the additional arguments
 */
export function parseArgs (script, extra = []) {
  const args = process.argv.slice(2)
  const [url, session, ...rest] = args
  if (!url || !session || rest.length < extra.length || !/^wss?:\/\//.test(url)) {
    const usage = ['ws://HOST:PORT', 'SESSION', ...extra.map((e) => e.toUpperCase())].join(' ')
    console.error(`usage: node ${script} ${usage} (got: ${JSON.stringify(args)})`)
    process.exit(2)
  }
  const serverUrl = url.replace(/\/+$/, '')
  return {
    serverUrl,
    session,
    httpBase: serverUrl.replace(/^ws/, 'http'),
    rest
  }
}

/**
 * Runs `body`, then exits 0; exits 1 with a message on any failure, on an unhandled error, or
 * when the whole run takes longer than OVERALL_MS. Providers are destroyed in every case.
 * @param {string} name
 * @param {() => Promise<void>} body
 */
export function main (name, body) {
  const fail = (what, err) => {
    console.error(`FAIL ${name}: ${what}${err ? ': ' + (err && err.stack ? err.stack : err) : ''}`)
    destroyAll()
    process.exit(1)
  }
  process.on('unhandledRejection', (err) => fail('unhandled rejection', err))
  process.on('uncaughtException', (err) => fail('uncaught exception', err))
  const overall = setTimeout(() => fail(`did not finish within ${OVERALL_MS} ms`), OVERALL_MS)
  body().then(
    () => {
      clearTimeout(overall)
      const unexpected = unexpectedCloses()
      if (unexpected.length > 0) {
        fail(`the server closed connections unexpectedly: ${JSON.stringify(unexpected)}`)
        return
      }
      destroyAll()
      console.log(`ok ${name}`)
      process.exit(0)
    },
    (err) => fail('assertion failed', err)
  )
}

/** Throws with `message` unless `cond`. */
export function check (cond, message) {
  if (!cond) {
    throw new Error(typeof message === 'function' ? message() : message)
  }
}

/** Prints one progress line (the Rust side shows it on failure, and may read it). */
export function step (line) {
  console.log(line)
}

/**
 * A provider of a fresh document on `/yjs/{session}`; BroadcastChannel is disabled so that
 * providers of one process sync only through the server.
 * @param {string} serverUrl
 * @param {string} session
 * @param {{user?: string, doc?: Y.Doc, connect?: boolean}} [opts]
 */
export function provider (serverUrl, session, opts = {}) {
  const doc = opts.doc ?? new Y.Doc()
  const p = new WebsocketProvider(serverUrl + '/yjs', session, doc, {
    WebSocketPolyfill: WebSocket,
    disableBc: true,
    connect: opts.connect ?? true,
    params: opts.user ? { user: opts.user } : {}
  })
  p.closesSeen = []
  p.closingOnPurpose = false
  p.on('connection-close', (event) => {
    // `event` is null when the provider closed the socket itself.
    if (event && !p.closingOnPurpose) {
      p.closesSeen.push({ code: event.code, reason: event.reason })
    }
  })
  providers.add(p)
  return p
}

/** Connects a provider and waits until it synced with the server. */
export async function syncedProvider (serverUrl, session, opts = {}) {
  const p = provider(serverUrl, session, opts)
  await waitUntil(`provider ${p.doc.clientID} to sync with ${p.url}`, () => p.synced, [[p, 'sync']])
  return p
}

/** Destroys a provider on purpose (its close is not reported as unexpected). */
export function destroy (p) {
  p.closingOnPurpose = true
  p.destroy()
  providers.delete(p)
}

/**
 * Drops a provider's connection the hard way: no goodbye awareness message, the TCP socket is
 * destroyed. Whatever the others learn afterwards comes from the server.
 */
export function kill (p) {
  p.closingOnPurpose = true
  p.shouldConnect = false
  const ws = p.ws
  if (ws && typeof ws.terminate === 'function') {
    ws.terminate()
  }
}

function destroyAll () {
  for (const p of providers) {
    p.closingOnPurpose = true
    try {
      p.destroy()
    } catch (_) {}
  }
  providers.clear()
}

function unexpectedCloses () {
  const out = []
  for (const p of providers) {
    if (p.closesSeen.length > 0) {
      out.push({ client: p.doc.clientID, closes: p.closesSeen })
    }
  }
  return out
}

/**
 * Resolves once `check()` returns a truthy value, re-evaluated on every event of `sources`
 * (`[emitter, eventName]` pairs); rejects after `ms` with `desc` and `detail()`.
 * @template T
 * @param {string} desc
 * @param {() => T} check
 * @param {Array<[any, string]>} sources
 * @param {{ms?: number, detail?: () => string}} [opts]
 * @returns {Promise<T>}
 */
export function waitUntil (desc, check, sources, opts = {}) {
  const ms = opts.ms ?? WAIT_MS
  return new Promise((resolve, reject) => {
    let finished = false
    const unsubscribe = []
    let timer = null
    const done = (err, value) => {
      if (finished) return
      finished = true
      if (timer !== null) clearTimeout(timer)
      for (const u of unsubscribe) u()
      if (err) reject(err)
      else resolve(value)
    }
    const test = () => {
      if (finished) return
      try {
        const value = check()
        if (value) done(null, value)
      } catch (err) {
        done(err)
      }
    }
    for (const [emitter, event] of sources) {
      emitter.on(event, test)
      unsubscribe.push(() => emitter.off(event, test))
    }
    timer = setTimeout(() => {
      let extra = ''
      try {
        extra = opts.detail ? '\n' + opts.detail() : ''
      } catch (err) {
        extra = `\n(detail failed: ${err})`
      }
      done(new Error(`timed out after ${ms} ms waiting for ${desc}${extra}`))
    }, ms)
    test()
  })
}

/** Waits until every document holds the same state (state vector and delete set). */
export function waitConverged (desc, docs, opts = {}) {
  return waitUntil(
    desc,
    () => {
      const first = Y.snapshot(docs[0])
      return docs.every((d) => Y.equalSnapshots(first, Y.snapshot(d)))
    },
    docs.map((d) => [d, 'update']),
    {
      ...opts,
      detail: () =>
        docs
          .map((d) => `client ${d.clientID}: sv ${JSON.stringify([...Y.snapshot(d).sv])}`)
          .join('\n')
    }
  )
}

/** JSON with object keys sorted recursively, for comparisons. */
export function canonical (value) {
  return JSON.stringify(sortKeys(value))
}

function sortKeys (value) {
  if (Array.isArray(value)) return value.map(sortKeys)
  if (value !== null && typeof value === 'object') {
    const out = {}
    for (const key of Object.keys(value).sort()) out[key] = sortKeys(value[key])
    return out
  }
  return value
}

/** The `items` map of a document as plain JSON. */
export function itemsJson (doc) {
  return doc.getMap('items').toJSON()
}

/**
 * Throws unless `actual` and `expected` are equal as canonical JSON, naming the first keys
 * that differ.
 */
export function assertSameJson (what, actual, expected) {
  const a = canonical(actual)
  const e = canonical(expected)
  if (a === e) return
  const diff = []
  if (isObject(actual) && isObject(expected)) {
    for (const key of new Set([...Object.keys(actual), ...Object.keys(expected)])) {
      if (canonical(actual[key] ?? null) !== canonical(expected[key] ?? null)) {
        diff.push(`  ${key}: got ${canonical(actual[key] ?? null)}, expected ${canonical(expected[key] ?? null)}`)
        if (diff.length >= 10) break
      }
    }
  }
  throw new Error(
    `${what} differ` + (diff.length ? ':\n' + diff.join('\n') : `:\n  got      ${a}\n  expected ${e}`)
  )
}

function isObject (v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v)
}

/**
 * The scene item the server must serve for a document item (PROTOCOL §3.1): its fields plus
 * `uuid` and `item_uuid` (both the key) and `item_type` (the field `item_type` if a string,
 * else `_type` if a string, else "component").
 */
export function expectedSceneItem (uuid, fields) {
  const itemType =
    typeof fields.item_type === 'string'
      ? fields.item_type
      : typeof fields._type === 'string'
        ? fields._type
        : 'component'
  return { ...fields, uuid, item_uuid: uuid, item_type: itemType }
}

/** `GET` a JSON document from the server's HTTP API. */
export async function getJson (httpBase, path) {
  const res = await fetch(httpBase + path, { signal: AbortSignal.timeout(WAIT_MS) })
  const text = await res.text()
  check(res.status === 200, `GET ${path}: status ${res.status}: ${text}`)
  return JSON.parse(text)
}

/** `GET /api/sessions/{s}/update` applied to a fresh document. */
export async function serverDoc (httpBase, session) {
  const path = `/api/sessions/${encodeURIComponent(session)}/update`
  const res = await fetch(httpBase + path, { signal: AbortSignal.timeout(WAIT_MS) })
  const body = new Uint8Array(await res.arrayBuffer())
  check(res.status === 200, `GET ${path}: status ${res.status}: ${new TextDecoder().decode(body)}`)
  const type = res.headers.get('content-type') ?? ''
  check(type.startsWith('application/octet-stream'), `GET ${path}: content-type ${type}`)
  const doc = new Y.Doc()
  Y.applyUpdate(doc, body)
  return doc
}

/**
 * Checks that `GET /api/sessions/{s}/scene` lists exactly the items of `items` (a document's
 * items map as JSON), each as `expectedSceneItem` describes.
 */
export async function assertSceneMatches (httpBase, session, items) {
  const scene = await getJson(httpBase, `/api/sessions/${encodeURIComponent(session)}/scene`)
  check(Array.isArray(scene.items), `scene has no items array: ${JSON.stringify(scene).slice(0, 300)}`)
  check(Number.isInteger(scene.version), `scene version is not an integer: ${scene.version}`)
  const served = {}
  for (const item of scene.items) {
    check(typeof item.uuid === 'string', `scene item without uuid: ${JSON.stringify(item)}`)
    check(!(item.uuid in served), `scene lists ${item.uuid} twice`)
    served[item.uuid] = item
  }
  const expected = {}
  for (const [uuid, fields] of Object.entries(items)) {
    expected[uuid] = expectedSceneItem(uuid, fields)
  }
  assertSameJson('scene items (GET /scene) and document items', served, expected)
  return scene
}

/** A deterministic PRNG (mulberry32) so a failing random run can be replayed by its seed. */
export function rng (seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** A v4-shaped uuid from `random`. */
export function uuidFrom (random) {
  const hex = () => Math.floor(random() * 16).toString(16)
  const part = (n) => Array.from({ length: n }, hex).join('')
  return `${part(8)}-${part(4)}-4${part(3)}-${'89ab'[Math.floor(random() * 4)]}${part(3)}-${part(12)}`
}

/** Puts a new `Y.Map` of `fields` at `items[uuid]`. */
export function setItem (doc, uuid, fields) {
  doc.transact(() => {
    const item = new Y.Map()
    for (const [k, v] of Object.entries(fields)) item.set(k, v)
    doc.getMap('items').set(uuid, item)
  })
}

export { Y }
