// Awareness through the server: a state set by one provider is seen by another, a provider
// joining later gets the states already there, and a state is removed when its provider goes,
// both when it says goodbye (destroy) and when its connection just drops (the removal then
// comes from the server alone).
//
//   node awareness.mjs ws://HOST:PORT SESSION

import { main, parseArgs, syncedProvider, waitUntil, check, step, destroy, kill, canonical } from './lib.mjs'

const { serverUrl, session } = parseArgs('awareness.mjs')

/** Waits until `observer` holds `state` for `client` (or no state, when `state` is null). */
function awaitState (observer, client, state, desc) {
  const aw = observer.awareness
  return waitUntil(
    desc,
    () => {
      const seen = aw.getStates().get(client)
      return state === null ? seen === undefined : seen !== undefined && canonical(seen) === canonical(state)
    },
    [[aw, 'change']],
    { detail: () => `states seen by ${observer.doc.clientID}: ${JSON.stringify([...aw.getStates()])}` }
  )
}

main('awareness', async () => {
  const alice = await syncedProvider(serverUrl, session, { user: 'alice' })
  const bob = await syncedProvider(serverUrl, session, { user: 'bob' })

  const aliceState = { user: { name: 'alice', color: '#DC143C' }, cursor: { x_mm: 12.5, y_mm: -3 }, selection: ['item-1'] }
  alice.awareness.setLocalState(aliceState)
  await awaitState(bob, alice.doc.clientID, aliceState, 'bob to see alice\'s state')
  step('bob sees alice')

  const bobState = { user: { name: 'bob', color: '#1E90FF' }, cursor: null }
  bob.awareness.setLocalState(bobState)
  await awaitState(alice, bob.doc.clientID, bobState, 'alice to see bob\'s state')
  step('alice sees bob')

  // An update of a state replaces it on the other side.
  const aliceMoved = { ...aliceState, cursor: { x_mm: 100, y_mm: 50.25 } }
  alice.awareness.setLocalState(aliceMoved)
  await awaitState(bob, alice.doc.clientID, aliceMoved, 'bob to see alice\'s updated state')
  step('bob sees alice move')

  // A provider joining now gets both states from the server (nobody re-sends them).
  const carol = await syncedProvider(serverUrl, session, { user: 'carol' })
  await awaitState(carol, alice.doc.clientID, aliceMoved, 'carol (joined late) to see alice\'s state')
  await awaitState(carol, bob.doc.clientID, bobState, 'carol (joined late) to see bob\'s state')
  step('carol sees alice and bob')

  // Alice's connection drops without a goodbye: the server must remove her state.
  kill(alice)
  await awaitState(bob, alice.doc.clientID, null, 'bob to see alice\'s state removed after her connection dropped')
  await awaitState(carol, alice.doc.clientID, null, 'carol to see alice\'s state removed after her connection dropped')
  step('alice removed after her connection dropped')

  // Bob leaves properly.
  destroy(bob)
  await awaitState(carol, bob.doc.clientID, null, 'carol to see bob\'s state removed after he left')
  step('bob removed after he left')

  check(carol.awareness.getStates().size === 1, () => `carol should see only herself: ${JSON.stringify([...carol.awareness.getStates()])}`)
})
