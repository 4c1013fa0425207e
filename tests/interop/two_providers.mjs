// Two y-websocket providers edit `items` concurrently through the server and converge.
//
//   node two_providers.mjs ws://HOST:PORT SESSION
//
// The edits of each round are made in one tick on both documents, so neither has seen the
// other's before making its own: they are truly concurrent.

import {
  main, parseArgs, syncedProvider, waitConverged, itemsJson, assertSameJson, check, step,
  setItem, assertSceneMatches, serverDoc, Y
} from './lib.mjs'

const { serverUrl, session, httpBase } = parseArgs('two_providers.mjs')

main('two_providers', async () => {
  const a = await syncedProvider(serverUrl, session, { user: 'yjs-a' })
  const b = await syncedProvider(serverUrl, session, { user: 'yjs-b' })
  const docs = [a.doc, b.doc]
  const items = (p) => p.doc.getMap('items')

  // Round 1: each adds its own items at the same time, plus one shared uuid added by both.
  setItem(a.doc, 'item-a', { item_type: 'component', item_uuid: 'item-a', name: 'L1', x_mm: 10.5, y_mm: 0, angle_deg: 0, interfaces: [{ element_type: 'lens', efl_mm: 100, x1_mm: 0, y1_mm: 12.7, x2_mm: 0, y2_mm: -12.7 }] })
  setItem(b.doc, 'item-b', { item_type: 'source', item_uuid: 'item-b', name: 'S1', x_mm: -50, y_mm: 2.25, angle_deg: 90, n_rays: 7, color_hex: '#DC143C' })
  setItem(a.doc, 'both', { item_type: 'ruler', item_uuid: 'both', x_mm: 1, y_mm: 1, angle_deg: 0, name: 'from a' })
  setItem(b.doc, 'both', { item_type: 'ruler', item_uuid: 'both', x_mm: 2, y_mm: 2, angle_deg: 0, name: 'from b' })
  await waitConverged('round 1 (concurrent adds) to converge', docs)
  assertSameJson('items after round 1', itemsJson(a.doc), itemsJson(b.doc))
  check(Object.keys(itemsJson(a.doc)).sort().join() === 'both,item-a,item-b', () => `items after round 1: ${Object.keys(itemsJson(a.doc))}`)
  step('round 1 converged')

  // Round 2: concurrent edits of different fields of one item both survive; the same field
  // edited by both ends with one of the two values on both sides.
  items(a).get('item-a').set('x_mm', 42.5)
  items(b).get('item-a').set('name', 'L1 renamed')
  items(a).get('item-b').set('angle_deg', 45)
  items(b).get('item-b').set('angle_deg', 135)
  await waitConverged('round 2 (concurrent field edits) to converge', docs)
  const round2 = itemsJson(a.doc)
  assertSameJson('items after round 2', round2, itemsJson(b.doc))
  check(round2['item-a'].x_mm === 42.5, () => `x_mm of item-a lost: ${JSON.stringify(round2['item-a'])}`)
  check(round2['item-a'].name === 'L1 renamed', () => `name of item-a lost: ${JSON.stringify(round2['item-a'])}`)
  check([45, 135].includes(round2['item-b'].angle_deg), () => `angle_deg of item-b: ${round2['item-b'].angle_deg}`)
  step('round 2 converged')

  // Round 3: one deletes an item while the other edits it; one edits while the other adds.
  items(a).delete('item-b')
  items(b).get('item-b').set('x_mm', 99)
  items(b).get('both').set('z_value', 3)
  setItem(a.doc, 'item-c', { item_type: 'text', item_uuid: 'item-c', text: 'hello', x_mm: 0, y_mm: 0, angle_deg: 0, locked: true })
  await waitConverged('round 3 (delete vs edit) to converge', docs)
  const round3 = itemsJson(a.doc)
  assertSameJson('items after round 3', round3, itemsJson(b.doc))
  check(!('item-b' in round3), 'a deleted item came back')
  check(round3.both.z_value === 3, () => `z_value of "both": ${JSON.stringify(round3.both)}`)
  step('round 3 converged')

  // A burst of many small concurrent updates from both.
  for (let i = 0; i < 50; i++) {
    items(a).get('item-a').set('x_mm', i)
    items(b).get('item-c').set('y_mm', -i)
  }
  await waitConverged('the burst to converge', docs)
  assertSameJson('items after the burst', itemsJson(a.doc), itemsJson(b.doc))
  step('burst converged')

  // The server holds the same document, and its scene shows it.
  const server = await serverDoc(httpBase, session)
  check(Y.equalSnapshots(Y.snapshot(server), Y.snapshot(a.doc)), 'the server document (GET update) differs from the providers\'')
  assertSameJson('server document items', itemsJson(server), itemsJson(a.doc))
  await assertSceneMatches(httpBase, session, itemsJson(a.doc))
  step('server matches')
})
