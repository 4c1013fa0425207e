//! The session's awareness states (cursors, selections, user names of Yjs clients), bounded.
//!
//! Semantics follow y-protocols: a state replaces an older one when its clock is higher, or
//! when it is a removal (`null`) at the same clock. Each state remembers which connection
//! introduced it, so closing that connection removes it; states not renewed for 30 s expire,
//! as Yjs clients expect (they renew every 15 s).
//!
//! Stricter than y-protocols, because every peer parses what it relays: a state must be a JSON
//! object (a `y-websocket` client throws on anything else and stops syncing), only the
//! connection that introduced a client id may change or remove its state (a reconnecting client
//! gets its id back once the old connection is closed or its state expired), and the states of
//! a session are bounded in count and total bytes, so the frame a joiner receives is bounded.
//! The bounds are shared fairly: a state that does not fit takes the room of the connection
//! holding the most, as long as that one holds more than the newcomer would; so one
//! connection that filled the session cannot keep the others' states out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::ClientID;

use crate::doc::guard::CheckedAwareness;
use crate::doc::PeerId;

/// States not renewed for this long are removed.
pub const AWARENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Who introduced an awareness state: a connection of this node, or one of another node
/// (`--cluster`), whose states this node relays under the same rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    Local(PeerId),
    Remote { node: u64, peer: PeerId },
}

impl From<PeerId> for Owner {
    fn from(peer: PeerId) -> Owner {
        Owner::Local(peer)
    }
}

#[derive(Debug)]
struct State {
    clock: u32,
    json: Arc<str>,
    owner: Owner,
    renewed: Instant,
}

/// Why an awareness update was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwarenessError(pub String);

impl std::fmt::Display for AwarenessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an applied awareness update changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// The update to send to the others: the states changed, and those removed to make room;
    /// `None` when nothing changed.
    pub changed: Option<Vec<u8>>,
    /// The other connections whose states were removed to make room, each with its removal.
    pub evicted: Vec<(Owner, Vec<u8>)>,
}

/// A connection's share of the session's awareness states, while room is made.
struct Holding {
    bytes: i64,
    count: i64,
    /// Its states' sizes and ids, largest last.
    states: Vec<(usize, ClientID)>,
}

/// All awareness states of one session.
#[derive(Debug)]
pub struct AwarenessStates {
    states: HashMap<ClientID, State>,
    /// Clocks of removed states, so a late duplicate cannot resurrect them.
    removed: HashMap<ClientID, u32>,
    /// Bytes of every state's JSON.
    total_bytes: usize,
    max_state_bytes: usize,
    max_states: usize,
    max_total_bytes: usize,
}

impl AwarenessStates {
    pub fn new(max_state_bytes: usize, max_states: usize, max_total_bytes: usize) -> Self {
        AwarenessStates {
            states: HashMap::new(),
            removed: HashMap::new(),
            total_bytes: 0,
            max_state_bytes,
            max_states,
            max_total_bytes,
        }
    }

    /// Bytes of every state's JSON.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Applies an awareness update from `owner`, making room for it if the session's bounds
    /// are reached ([`AwarenessStates::room_for`]). Refused as a whole, changing nothing,
    /// when a state breaks a rule or no room can be made.
    pub fn apply(
        &mut self,
        owner: impl Into<Owner>,
        bytes: &CheckedAwareness,
        now: Instant,
    ) -> Result<Applied, AwarenessError> {
        let owner = owner.into();
        let update =
            AwarenessUpdate::decode_v1(bytes.bytes()).map_err(|e| AwarenessError(e.to_string()))?;
        // Net change of the total, counting only the entries applied below (a stale one that
        // would shrink a state frees nothing); removals are not counted, so this may only
        // overestimate.
        let mut added_bytes = 0i64;
        let mut new_clients = 0usize;
        for (client, entry) in &update.clients {
            if entry.json.len() > self.max_state_bytes {
                return Err(AwarenessError(format!(
                    "awareness state of client {client} exceeds {} bytes",
                    self.max_state_bytes
                )));
            }
            let removal = is_null(&entry.json);
            if !removal
                && serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&entry.json)
                    .is_err()
            {
                return Err(AwarenessError(format!(
                    "awareness state of client {client} is not a JSON object or null"
                )));
            }
            match self.states.get(client) {
                Some(state) if state.owner != owner => {
                    return Err(AwarenessError(format!(
                        "awareness client {client} belongs to another connection"
                    )));
                }
                _ if !self.accepts(*client, entry.clock, removal) => {}
                Some(state) if !removal => {
                    added_bytes += len_i64(&entry.json) - len_i64(&state.json);
                }
                Some(_) => {}
                None if !removal => {
                    new_clients += 1;
                    added_bytes += len_i64(&entry.json);
                }
                None => {}
            }
        }
        let victims = self.room_for(owner, added_bytes, new_clients)?;
        let mut changed = HashMap::new();
        let mut evicted: Vec<(Owner, HashMap<ClientID, AwarenessUpdateEntry>)> = Vec::new();
        for (victim, client, removal) in self.remove_ids(victims) {
            changed.insert(client, removal.clone());
            match evicted.iter_mut().find(|(o, _)| *o == victim) {
                Some((_, removals)) => drop(removals.insert(client, removal)),
                None => evicted.push((victim, HashMap::from([(client, removal)]))),
            }
        }
        for (client, entry) in update.clients {
            let removal = is_null(&entry.json);
            if !self.accepts(client, entry.clock, removal) {
                continue;
            }
            if removal {
                if let Some(gone) = self.states.remove(&client) {
                    self.total_bytes -= gone.json.len();
                }
                self.removed.insert(client, entry.clock);
            } else {
                self.removed.remove(&client);
                self.total_bytes += entry.json.len();
                if let Some(replaced) = self.states.get(&client) {
                    self.total_bytes -= replaced.json.len();
                }
                self.states.insert(
                    client,
                    State {
                        clock: entry.clock,
                        json: entry.json.clone(),
                        owner,
                        renewed: now,
                    },
                );
            }
            changed.insert(client, entry);
        }
        Ok(Applied {
            changed: encode(changed),
            evicted: evicted
                .into_iter()
                .filter_map(|(victim, removals)| Some((victim, encode(removals)?)))
                .collect(),
        })
    }

    /// Whether an entry for `client` at `clock` changes its state (y-protocols' rule): a
    /// higher clock, or a removal at the same clock; a removed state comes back only with a
    /// higher clock than its removal's.
    fn accepts(&self, client: ClientID, clock: u32, removal: bool) -> bool {
        match self.states.get(&client) {
            Some(state) => state.clock < clock || (state.clock == clock && removal),
            None => !removal && self.removed.get(&client).is_none_or(|c| *c < clock),
        }
    }

    /// The states to remove so that `owner`'s update, adding `added_bytes` and `new_clients`
    /// states, fits the session's bounds: none while it fits; else, one at a time, the largest
    /// state of the connection holding the most (bytes, or states when only the count is
    /// short) among those holding more than `owner` would. Refused when they cannot make room.
    fn room_for(
        &self,
        owner: Owner,
        added_bytes: i64,
        new_clients: usize,
    ) -> Result<Vec<ClientID>, AwarenessError> {
        let mut bytes_short =
            len_i64_of(self.total_bytes) + added_bytes - len_i64_of(self.max_total_bytes);
        let mut states_short =
            len_i64_of(self.states.len() + new_clients) - len_i64_of(self.max_states);
        if bytes_short <= 0 && states_short <= 0 {
            return Ok(Vec::new());
        }
        let mut holdings: HashMap<Owner, Holding> = HashMap::new();
        for (client, state) in &self.states {
            let holding = holdings.entry(state.owner).or_insert(Holding {
                bytes: 0,
                count: 0,
                states: Vec::new(),
            });
            holding.bytes += len_i64(&state.json);
            holding.count += 1;
            holding.states.push((state.json.len(), *client));
        }
        let (own_bytes, own_count) = holdings
            .remove(&owner)
            .map_or((0, 0), |h| (h.bytes, h.count));
        let (own_bytes, own_count) = (own_bytes + added_bytes, own_count + len_i64_of(new_clients));
        for holding in holdings.values_mut() {
            holding.states.sort_unstable();
        }
        let mut victims = Vec::new();
        while bytes_short > 0 || states_short > 0 {
            let by_bytes = bytes_short > 0;
            let largest = holdings
                .values_mut()
                .filter(|h| {
                    if by_bytes {
                        h.bytes > own_bytes
                    } else {
                        h.count > own_count
                    }
                })
                .max_by_key(|h| if by_bytes { h.bytes } else { h.count });
            let Some((len, client)) = largest.and_then(|h| {
                let state = h.states.pop()?;
                h.bytes -= len_i64_of(state.0);
                h.count -= 1;
                Some(state)
            }) else {
                return Err(AwarenessError(format!(
                    "a session's awareness states may number at most {} and hold at most {} \
                     bytes, and no other connection holds more than this one would",
                    self.max_states, self.max_total_bytes
                )));
            };
            bytes_short -= len_i64_of(len);
            states_short -= 1;
            victims.push(client);
        }
        Ok(victims)
    }

    /// Every state, encoded, or `None` when there are none.
    pub fn encode_all(&self) -> Option<Vec<u8>> {
        encode(
            self.states
                .iter()
                .map(|(id, s)| {
                    (
                        *id,
                        AwarenessUpdateEntry {
                            clock: s.clock,
                            json: s.json.clone(),
                        },
                    )
                })
                .collect(),
        )
    }

    /// Every state `owner` introduced, encoded, or `None` when there are none.
    pub fn encode_owner(&self, owner: impl Into<Owner>) -> Option<Vec<u8>> {
        let owner = owner.into();
        encode(
            self.states
                .iter()
                .filter(|(_, s)| s.owner == owner)
                .map(|(id, s)| {
                    (
                        *id,
                        AwarenessUpdateEntry {
                            clock: s.clock,
                            json: s.json.clone(),
                        },
                    )
                })
                .collect(),
        )
    }

    /// Removes the states `owner` introduced; returns the encoded removal.
    pub fn remove_owner(&mut self, owner: impl Into<Owner>) -> Option<Vec<u8>> {
        let owner = owner.into();
        self.remove_where(|s| s.owner == owner)
    }

    /// Removes the states another node's connections introduced (that node is gone).
    pub fn remove_node(&mut self, gone: u64) -> Option<Vec<u8>> {
        self.remove_where(|s| matches!(s.owner, Owner::Remote { node, .. } if node == gone))
    }

    /// Removes states not renewed within [`AWARENESS_TIMEOUT`]; returns the encoded removal.
    pub fn expire(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.remove_where(|s| now.saturating_duration_since(s.renewed) >= AWARENESS_TIMEOUT)
    }

    /// As [`AwarenessStates::expire`], one removal per owner whose states expired.
    pub fn expire_by_owner(&mut self, now: Instant) -> Vec<(Owner, Vec<u8>)> {
        let expired = |s: &State| now.saturating_duration_since(s.renewed) >= AWARENESS_TIMEOUT;
        let mut owners: Vec<Owner> = Vec::new();
        for state in self.states.values().filter(|s| expired(s)) {
            if !owners.contains(&state.owner) {
                owners.push(state.owner);
            }
        }
        owners
            .into_iter()
            .filter_map(|owner| {
                let removal = self.remove_where(|s| s.owner == owner && expired(s))?;
                Some((owner, removal))
            })
            .collect()
    }

    fn remove_where(&mut self, doomed: impl Fn(&State) -> bool) -> Option<Vec<u8>> {
        let ids: Vec<ClientID> = self
            .states
            .iter()
            .filter(|(_, s)| doomed(s))
            .map(|(id, _)| *id)
            .collect();
        encode(
            self.remove_ids(ids)
                .into_iter()
                .map(|(_, id, removal)| (id, removal))
                .collect(),
        )
    }

    /// Removes the states `ids`; returns each one's owner, id and removal entry.
    fn remove_ids(&mut self, ids: Vec<ClientID>) -> Vec<(Owner, ClientID, AwarenessUpdateEntry)> {
        let mut removed = Vec::new();
        for id in ids {
            if let Some(state) = self.states.remove(&id) {
                self.total_bytes -= state.json.len();
                // Same clock, as y-protocols does: a removal at the current clock is
                // accepted by peers, and the client's next renewal (clock + 1) revives it.
                let clock = state.clock;
                self.removed.insert(id, clock);
                let removal = AwarenessUpdateEntry {
                    clock,
                    json: "null".into(),
                };
                removed.push((state.owner, id, removal));
            }
        }
        if self.removed.len() > self.max_states * 4 {
            self.removed.clear();
        }
        removed
    }
}

fn len_i64(json: &str) -> i64 {
    len_i64_of(json.len())
}

fn len_i64_of(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn is_null(json: &str) -> bool {
    json.trim() == "null"
}

fn encode(clients: HashMap<ClientID, AwarenessUpdateEntry>) -> Option<Vec<u8>> {
    (!clients.is_empty()).then(|| AwarenessUpdate { clients }.encode_v1())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(entries: &[(u64, u32, &str)]) -> CheckedAwareness {
        let bytes = AwarenessUpdate {
            clients: entries
                .iter()
                .map(|(id, clock, json)| {
                    (
                        ClientID::new(*id),
                        AwarenessUpdateEntry {
                            clock: *clock,
                            json: (*json).into(),
                        },
                    )
                })
                .collect(),
        }
        .encode_v1();
        CheckedAwareness::check(bytes).expect("a valid awareness update")
    }

    fn decoded(bytes: Vec<u8>) -> AwarenessUpdate {
        AwarenessUpdate::decode_v1(&bytes).unwrap()
    }

    #[test]
    fn newer_clocks_replace_and_owner_close_removes() {
        let now = Instant::now();
        let mut aw = AwarenessStates::new(1024, 10, 1 << 20);
        assert!(aw
            .apply(1, &update(&[(7, 1, "{\"a\":1}")]), now)
            .unwrap()
            .changed
            .is_some());
        assert!(
            aw.apply(1, &update(&[(7, 1, "{\"a\":2}")]), now)
                .unwrap()
                .changed
                .is_none(),
            "same clock"
        );
        assert!(aw
            .apply(1, &update(&[(7, 2, "{\"a\":3}")]), now)
            .unwrap()
            .changed
            .is_some());
        let removal = decoded(aw.remove_owner(1).unwrap());
        assert_eq!(removal.clients[&ClientID::new(7)].clock, 2);
        assert_eq!(&*removal.clients[&ClientID::new(7)].json, "null");
        assert!(aw.is_empty());
        assert!(
            aw.apply(2, &update(&[(7, 2, "{\"a\":3}")]), now)
                .unwrap()
                .changed
                .is_none(),
            "no resurrection at the removed clock"
        );
        assert!(aw
            .apply(2, &update(&[(7, 3, "{\"a\":4}")]), now)
            .unwrap()
            .changed
            .is_some());
    }

    #[test]
    fn bounds_and_expiry() {
        let now = Instant::now();
        let mut aw = AwarenessStates::new(8, 2, 1 << 20);
        assert!(aw
            .apply(1, &update(&[(1, 1, "{\"a\":\"0123\"}")]), now)
            .is_err());
        aw.apply(1, &update(&[(1, 1, "{}"), (2, 1, "{}")]), now)
            .unwrap();
        assert!(aw.apply(1, &update(&[(3, 1, "{}")]), now).is_err());
        assert_eq!(aw.len(), 2);
        assert!(aw.expire(now + Duration::from_secs(5)).is_none());
        let gone = decoded(aw.expire(now + AWARENESS_TIMEOUT).unwrap());
        assert_eq!(gone.clients.len(), 2);
        assert!(aw.encode_all().is_none());
        assert!(CheckedAwareness::check(vec![0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    #[test]
    fn states_are_json_objects_or_null() {
        let now = Instant::now();
        let mut aw = AwarenessStates::new(1024, 10, 1 << 20);
        for bad in ["1", "\"x\"", "[1]", "true", "{", "nope", ""] {
            assert!(
                aw.apply(1, &update(&[(1, 1, "{}"), (2, 1, bad)]), now)
                    .is_err(),
                "{bad:?}"
            );
            assert!(aw.is_empty(), "a refused update changes nothing");
        }
        assert!(aw
            .apply(1, &update(&[(1, 1, "{\"user\":{\"name\":\"a\"}}")]), now)
            .unwrap()
            .changed
            .is_some());
        assert!(aw
            .apply(1, &update(&[(1, 1, "null")]), now)
            .unwrap()
            .changed
            .is_some());
        assert!(aw.is_empty());
    }

    #[test]
    fn only_the_introducing_connection_changes_a_state() {
        let now = Instant::now();
        let mut aw = AwarenessStates::new(1024, 10, 1 << 20);
        aw.apply(1, &update(&[(7, 1, "{\"a\":1}")]), now).unwrap();
        for (clock, json) in [(2, "{\"a\":2}"), (2, "null"), (1, "null")] {
            assert!(
                aw.apply(2, &update(&[(8, 1, "{}"), (7, clock, json)]), now)
                    .is_err(),
                "{clock} {json}"
            );
        }
        assert_eq!(aw.len(), 1);
        let all = decoded(aw.encode_all().unwrap());
        assert_eq!(&*all.clients[&ClientID::new(7)].json, "{\"a\":1}");
        // Once its connection is gone the id is free again (a y-websocket client keeps its
        // id across reconnects).
        aw.remove_owner(1);
        assert!(aw
            .apply(2, &update(&[(7, 2, "{}")]), now)
            .unwrap()
            .changed
            .is_some());
    }

    #[test]
    fn total_bytes_are_bounded() {
        let now = Instant::now();
        let state = format!("{{\"c\":\"{}\"}}", "x".repeat(90));
        let mut aw = AwarenessStates::new(1024, 100, 250);
        aw.apply(1, &update(&[(1, 1, &state), (2, 1, &state)]), now)
            .unwrap();
        assert_eq!(aw.total_bytes(), 2 * state.len());
        assert!(aw.apply(1, &update(&[(3, 1, &state)]), now).is_err());
        // Shrinking one's own state makes room.
        aw.apply(1, &update(&[(2, 2, "{}")]), now).unwrap();
        assert_eq!(aw.total_bytes(), state.len() + 2);
        aw.apply(2, &update(&[(3, 1, &state)]), now).unwrap();
        aw.remove_owner(1);
        assert_eq!(aw.total_bytes(), state.len());
        assert!(aw.expire(now + AWARENESS_TIMEOUT).is_some());
        assert_eq!(aw.total_bytes(), 0);
    }

    /// One connection that filled the session's bounds yields its largest states to another
    /// connection's, not the other way round, and a refused update changes nothing.
    #[test]
    fn a_connection_that_filled_the_session_yields_room_to_the_others() {
        let now = Instant::now();
        let big = format!("{{\"c\":\"{}\"}}", "x".repeat(90));
        let small = "{\"u\":1}";
        let mut aw = AwarenessStates::new(1024, 3, 150);
        aw.apply(1, &update(&[(1, 1, &big), (2, 1, "{}")]), now)
            .unwrap();
        // Bytes short: the holder of the most gives up its largest state.
        let applied = aw.apply(2, &update(&[(10, 1, &big)]), now).unwrap();
        assert_eq!(applied.evicted.len(), 1);
        assert_eq!(applied.evicted[0].0, Owner::Local(1));
        let removal = decoded(applied.evicted[0].1.clone());
        assert_eq!(&*removal.clients[&ClientID::new(1)].json, "null");
        let sent = decoded(applied.changed.unwrap());
        assert_eq!(&*sent.clients[&ClientID::new(1)].json, "null");
        assert_eq!(&*sent.clients[&ClientID::new(10)].json, big);
        assert_eq!(aw.total_bytes(), big.len() + 2);
        // The one that yielded cannot take the room back: it would hold more.
        assert!(aw.apply(1, &update(&[(1, 2, &big)]), now).is_err());
        assert_eq!(aw.total_bytes(), big.len() + 2);
        // States short: the holder of the most states gives one up, here connection 2 (two
        // states) to connection 3 (one).
        aw.apply(2, &update(&[(11, 1, "{}")]), now).unwrap();
        let applied = aw.apply(3, &update(&[(20, 1, small)]), now).unwrap();
        assert_eq!(applied.evicted.len(), 1);
        assert_eq!(applied.evicted[0].0, Owner::Local(2));
        assert_eq!(aw.len(), 3);
        // Equal holders do not displace each other.
        let before = (aw.len(), aw.total_bytes());
        assert!(aw.apply(4, &update(&[(30, 1, small)]), now).is_err());
        assert_eq!(
            (aw.len(), aw.total_bytes()),
            before,
            "a refused update changes nothing"
        );
    }
}
