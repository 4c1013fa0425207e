// One session shared by an Optiverse JSON client (driven by tests/interop.rs) and y-websocket
// providers.
//
//   node mixed_session.mjs ws://HOST:PORT SESSION ITEM1 ITEM2
//
// ITEM1 and ITEM2 are JSON objects `{"uuid":U,"item_type":T,"data":{...}}`. The handshake:
//
//   Rust: the JSON client adds ITEM1 (`add_item`), then starts this script.
//   here: provider "yjs-editor" (with ?user=) syncs; ITEM1 must be in `items` with every field
//         of its data and its item_type.
//   here: sets x_mm only            -> prints "moved"    (JSON client must get move_item)
//   here: sets name                 -> prints "updated"  (JSON client must get update_item)
//   here: deletes the item          -> prints "removed"  (JSON client must get remove_item)
//   Rust: on remove_item, the JSON client adds ITEM2 and moves it (`add_item`, `move_item`).
//   here: waits until ITEM2 is in `items` with exactly ITEM2's data (the moved position)
//         -> prints "json changes seen", exits 0.
//
// Each change is awaited on a second (anonymous) provider, i.e. until the server applied and
// broadcast it, before the next one is made.

import { main, parseArgs, syncedProvider, waitUntil, check, step, canonical } from './lib.mjs'

const { serverUrl, session, rest } = parseArgs('mixed_session.mjs', ['item1', 'item2'])
const item1 = JSON.parse(rest[0])
const item2 = JSON.parse(rest[1])

// tests/interop.rs asserts on these two values.
const MOVED_X_MM = 123.25
const NEW_NAME = 'Renamed by Yjs'

/** Differences between a Y.Map item and `{item_type, data}`: keys of data plus item_type. */
function mismatches (itemMap, expected) {
  if (itemMap === undefined) return ['(item missing)']
  const fields = itemMap.toJSON()
  const out = []
  for (const [key, value] of Object.entries(expected.data)) {
    if (key === 'item_type') continue
    if (canonical(fields[key] ?? null) !== canonical(value)) {
      out.push(`${key}: got ${canonical(fields[key] ?? null)}, expected ${canonical(value)}`)
    }
  }
  if (fields.item_type !== expected.item_type) {
    out.push(`item_type: got ${fields.item_type}, expected ${expected.item_type}`)
  }
  return out
}

main('mixed_session', async () => {
  const editor = await syncedProvider(serverUrl, session, { user: 'yjs-editor' })
  const observer = await syncedProvider(serverUrl, session)
  const items = editor.doc.getMap('items')
  const seen = observer.doc.getMap('items')
  const observed = (desc, cond) =>
    waitUntil(desc, cond, [[observer.doc, 'update']], {
      detail: () => `observer's item: ${JSON.stringify(seen.get(item1.uuid)?.toJSON() ?? null)}`
    })

  const item = items.get(item1.uuid)
  const wrong = mismatches(item, item1)
  check(wrong.length === 0, () => `the JSON client's item as the Yjs client sees it:\n  ${wrong.join('\n  ')}`)
  step('item seen')

  item.set('x_mm', MOVED_X_MM)
  await observed('the server to broadcast the x_mm change', () => seen.get(item1.uuid)?.get('x_mm') === MOVED_X_MM)
  step('moved')

  item.set('name', NEW_NAME)
  await observed('the server to broadcast the name change', () => seen.get(item1.uuid)?.get('name') === NEW_NAME)
  step('updated')

  items.delete(item1.uuid)
  await observed('the server to broadcast the removal', () => !seen.has(item1.uuid))
  step('removed')

  await waitUntil(
    'the JSON client\'s add_item and move_item of item 2 to reach the Yjs client',
    () => mismatches(items.get(item2.uuid), item2).length === 0,
    [[editor.doc, 'update']],
    { detail: () => `item 2: ${mismatches(items.get(item2.uuid), item2).join('; ')}` }
  )
  step('json changes seen')
})
