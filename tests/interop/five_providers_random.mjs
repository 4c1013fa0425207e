// Five y-websocket providers make hundreds of random concurrent edits of `items` (add item
// maps with realistic fields, set fields, delete and re-add items); all converge, the server
// holds the same document, and a provider joining late gets the identical state at once.
//
//   node five_providers_random.mjs ws://HOST:PORT SESSION
//
// INTEROP_SEED=N replays one run (the seed is printed).

import {
  main, parseArgs, syncedProvider, waitConverged, itemsJson, assertSameJson, check, step,
  setItem, rng, uuidFrom, assertSceneMatches, serverDoc, Y
} from './lib.mjs'

const { serverUrl, session, httpBase } = parseArgs('five_providers_random.mjs')

const PROVIDERS = 5
const ROUNDS = 40
const OPS_PER_ROUND = 3 // per provider: 5 * 40 * 3 = 600 edits

const seed = Number.parseInt(process.env.INTEROP_SEED ?? '20261125', 10)
const random = rng(seed)
const pick = (list) => list[Math.floor(random() * list.length)]
const coordinate = () => Math.round((random() * 2000 - 1000) * 100) / 100
const angle = () => pick([0, 45, 90, 180, -30.5, Math.round(random() * 36000) / 100])

const TYPES = ['component', 'source', 'ruler', 'text', 'angle', 'path_measure', 'rectangle']

function newItemFields (uuid) {
  const itemType = pick(TYPES)
  const fields = {
    item_type: itemType,
    item_uuid: uuid,
    x_mm: coordinate(),
    y_mm: coordinate(),
    angle_deg: angle(),
    z_value: Math.floor(random() * 10),
    locked: random() < 0.2
  }
  switch (itemType) {
    case 'component':
      fields.name = pick(['Standard Lens (1" mounted)', 'Mirror', 'PBS', 'HWP'])
      fields.category = pick(['lenses', 'mirrors', 'waveplates'])
      fields.object_height_mm = 30.5
      fields.interfaces = [{
        x1_mm: 0, y1_mm: 15.25, x2_mm: 0, y2_mm: -15.25,
        element_type: pick(['lens', 'mirror', 'beam_splitter']),
        efl_mm: pick([50, 100, 200.5]),
        clear_aperture_mm: 25.4
      }]
      break
    case 'source':
      fields.n_rays = 1 + Math.floor(random() * 20)
      fields.wavelength_nm = pick([532, 633.0, 780.5, 1064])
      fields.color_hex = pick(['#DC143C', '#00FF00', '#1E90FF'])
      fields.polarization_type = pick(['horizontal', 'vertical', 'circular'])
      fields.use_custom_jones = false
      break
    case 'text':
      fields.text = `note ${Math.floor(random() * 1000)} ✓`
      fields.font_size = 12
      break
    case 'path_measure':
    case 'ruler':
      fields.points = [[coordinate(), coordinate()], [coordinate(), coordinate()]]
      break
    default:
      fields.width_mm = Math.abs(coordinate())
      fields.height_mm = Math.abs(coordinate())
  }
  return fields
}

/** One random edit on `doc`; returns a short description. */
function randomEdit (doc) {
  const items = doc.getMap('items')
  const uuids = [...items.keys()]
  const r = random()
  if (uuids.length === 0 || r < 0.25) {
    const uuid = uuidFrom(random)
    setItem(doc, uuid, newItemFields(uuid))
    return 'add'
  }
  const uuid = pick(uuids)
  const item = items.get(uuid)
  if (r < 0.40) {
    // a drag step: one transaction writing the position
    doc.transact(() => {
      item.set('x_mm', coordinate())
      item.set('y_mm', coordinate())
      item.set('angle_deg', angle())
    })
    return 'move'
  }
  if (r < 0.80) {
    const field = pick(['x_mm', 'name', 'locked', 'z_value', 'interfaces', 'notes', 'angle_deg'])
    const value = {
      x_mm: coordinate(),
      name: `renamed ${Math.floor(random() * 1e6)}`,
      locked: random() < 0.5,
      z_value: Math.floor(random() * 10),
      interfaces: [{ element_type: 'lens', efl_mm: Math.floor(random() * 500), x1_mm: 0, y1_mm: 1, x2_mm: 0, y2_mm: -1 }],
      notes: random() < 0.1 ? null : `n${Math.floor(random() * 100)}`,
      angle_deg: angle()
    }[field]
    item.set(field, value)
    return 'set'
  }
  if (r < 0.95) {
    items.delete(uuid)
    return 'delete'
  }
  // re-add an existing uuid: the whole item map is replaced
  setItem(doc, uuid, newItemFields(uuid))
  return 'replace'
}

main('five_providers_random', async () => {
  step(`seed ${seed}`)
  const providers = []
  for (let i = 0; i < PROVIDERS; i++) {
    providers.push(await syncedProvider(serverUrl, session, i % 2 === 0 ? { user: `yjs-${i}` } : {}))
  }
  const docs = providers.map((p) => p.doc)

  const counts = {}
  for (let round = 0; round < ROUNDS; round++) {
    for (const doc of docs) {
      for (let k = 0; k < OPS_PER_ROUND; k++) {
        const kind = randomEdit(doc)
        counts[kind] = (counts[kind] ?? 0) + 1
      }
    }
    // Now and then let the network run, so that edits mix concurrent and sequential ones.
    if (random() < 0.5) {
      await new Promise((resolve) => setImmediate(resolve))
    }
  }
  step(`edits made: ${JSON.stringify(counts)}`)

  await waitConverged('all five providers to converge', docs, { ms: 60_000 })
  const expected = itemsJson(docs[0])
  for (const doc of docs.slice(1)) {
    assertSameJson(`items of client ${doc.clientID} and client ${docs[0].clientID}`, itemsJson(doc), expected)
  }
  step(`converged with ${Object.keys(expected).length} items`)

  const late = await syncedProvider(serverUrl, session, { user: 'late' })
  check(
    Y.equalSnapshots(Y.snapshot(late.doc), Y.snapshot(docs[0])),
    'the late provider\'s state right after its sync differs from the others\''
  )
  assertSameJson('items of the late provider', itemsJson(late.doc), expected)
  step('late joiner identical')

  const server = await serverDoc(httpBase, session)
  check(Y.equalSnapshots(Y.snapshot(server), Y.snapshot(docs[0])), 'the server document (GET update) differs from the providers\'')
  assertSameJson('server document items', itemsJson(server), expected)
  await assertSceneMatches(httpBase, session, expected)
  step('server matches')
})
