// The HTTP document API with a real Yjs client (PROTOCOL §1).
//
//   node http_update.mjs ws://HOST:PORT SESSION POSTED_UUID
//
// The session is expected to hold items already (tests/interop.rs adds some through a JSON
// client). Checks:
//  * `GET /api/sessions/{s}/update` applied to a fresh Y.Doc gives the scene of
//    `GET /api/sessions/{s}/scene` (scene items carry `uuid`, `item_uuid` and `item_type` on
//    top of the document's fields) and the same state a provider syncs;
//  * an update POSTed (`Y.encodeStateAsUpdate` of a doc adding POSTED_UUID) reaches a connected
//    provider; a second, incremental one (moving that item) too;
//  * a POSTed body that is not a Yjs update is refused with 400 and changes nothing.

import {
  main, parseArgs, syncedProvider, waitUntil, check, step, canonical, itemsJson,
  assertSceneMatches, serverDoc, setItem, WAIT_MS, Y
} from './lib.mjs'

const { serverUrl, session, httpBase, rest } = parseArgs('http_update.mjs', ['posted_uuid'])
const postedUuid = rest[0]
const updatePath = `/api/sessions/${encodeURIComponent(session)}/update`

async function post (body) {
  const res = await fetch(httpBase + updatePath, {
    method: 'POST',
    headers: { 'content-type': 'application/octet-stream' },
    body,
    signal: AbortSignal.timeout(WAIT_MS)
  })
  return { status: res.status, text: await res.text() }
}

main('http_update', async () => {
  // GET: the document equals the scene and what a provider syncs.
  const fetched = await serverDoc(httpBase, session)
  const fetchedItems = itemsJson(fetched)
  check(Object.keys(fetchedItems).length > 0, 'GET update: the session should hold items already')
  await assertSceneMatches(httpBase, session, fetchedItems)
  const watcher = await syncedProvider(serverUrl, session)
  check(
    Y.equalSnapshots(Y.snapshot(watcher.doc), Y.snapshot(fetched)),
    'GET update and a provider\'s synced state differ'
  )
  step(`GET update equals the scene (${Object.keys(fetchedItems).length} items)`)

  // POST a whole-document update of a doc adding one item.
  const poster = new Y.Doc()
  const fields = {
    item_type: 'source',
    item_uuid: postedUuid,
    name: 'Posted source',
    x_mm: -25.5,
    y_mm: 10,
    angle_deg: 0,
    n_rays: 5,
    wavelength_nm: 632.8,
    color_hex: '#FF0000',
    interfaces: []
  }
  setItem(poster, postedUuid, fields)
  const first = await post(Y.encodeStateAsUpdate(poster))
  check(first.status === 200, () => `POST update: status ${first.status}: ${first.text}`)
  check(JSON.parse(first.text).status === 'applied', () => `POST update: body ${first.text}`)
  const seen = watcher.doc.getMap('items')
  await waitUntil(
    'the POSTed item to reach the provider',
    () => canonical(seen.get(postedUuid)?.toJSON() ?? null) === canonical(fields),
    [[watcher.doc, 'update']],
    { detail: () => JSON.stringify(seen.get(postedUuid)?.toJSON() ?? null) }
  )
  step('POSTed item reached the provider')

  // POST an incremental update (only what changed since the first POST).
  const before = Y.encodeStateVector(poster)
  poster.transact(() => {
    const item = poster.getMap('items').get(postedUuid)
    item.set('x_mm', 75.125)
    item.set('y_mm', -4)
    item.set('angle_deg', 30)
  })
  const second = await post(Y.encodeStateAsUpdate(poster, before))
  check(second.status === 200, () => `POST incremental update: status ${second.status}: ${second.text}`)
  const moved = { ...fields, x_mm: 75.125, y_mm: -4, angle_deg: 30 }
  await waitUntil(
    'the POSTed move to reach the provider',
    () => canonical(seen.get(postedUuid)?.toJSON() ?? null) === canonical(moved),
    [[watcher.doc, 'update']],
    { detail: () => JSON.stringify(seen.get(postedUuid)?.toJSON() ?? null) }
  )
  step('POSTed move reached the provider')

  // Garbage is refused and changes nothing.
  for (const bad of [new Uint8Array([0xff, 0xff, 0xff, 0xff, 0x0f]), new TextEncoder().encode('{"not":"yjs"}')]) {
    const res = await post(bad)
    check(res.status === 400, () => `POST of garbage ${JSON.stringify([...bad])}: status ${res.status}, expected 400: ${res.text}`)
  }
  const after = await serverDoc(httpBase, session)
  check(
    Y.equalSnapshots(Y.snapshot(after), Y.snapshot(watcher.doc)),
    'the server document changed after garbage POSTs, or differs from the provider\'s'
  )
  await assertSceneMatches(httpBase, session, itemsJson(watcher.doc))
  step('garbage refused; document unchanged')
})
