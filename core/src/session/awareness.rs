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
//! a session are bounded in total bytes, so the frame a joiner receives is bounded.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// Applies an awareness update from `owner`. Returns the encoded update of what
    /// changed (to broadcast), or `None` when nothing did.
    pub fn apply(
        &mut self,
        owner: impl Into<Owner>,
        bytes: &CheckedAwareness,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, AwarenessError> {
        let owner = owner.into();
        let update =
            AwarenessUpdate::decode_v1(bytes.bytes()).map_err(|e| AwarenessError(e.to_string()))?;
        // Net change of the total, counting every entry as accepted (an entry with an old clock
        // is skipped below, so this may only overestimate).
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
        if self.states.len() + new_clients > self.max_states {
            return Err(AwarenessError(format!(
                "a session may hold at most {} awareness states",
                self.max_states
            )));
        }
        if len_i64_of(self.total_bytes) + added_bytes > len_i64_of(self.max_total_bytes) {
            return Err(AwarenessError(format!(
                "a session's awareness states may hold at most {} bytes",
                self.max_total_bytes
            )));
        }
        let mut changed = HashMap::new();
        for (client, entry) in update.clients {
            let removal = is_null(&entry.json);
            let accept = match self.states.get(&client) {
                Some(state) => state.clock < entry.clock || (state.clock == entry.clock && removal),
                None => !removal && self.removed.get(&client).is_none_or(|c| *c < entry.clock),
            };
            if !accept {
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
        Ok(encode(changed))
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
        let mut removed = HashMap::new();
        for id in ids {
            if let Some(state) = self.states.remove(&id) {
                self.total_bytes -= state.json.len();
                // Same clock, as y-protocols does: a removal at the current clock is
                // accepted by peers, and the client's next renewal (clock + 1) revives it.
                let clock = state.clock;
                self.removed.insert(id, clock);
                removed.insert(
                    id,
                    AwarenessUpdateEntry {
                        clock,
                        json: "null".into(),
                    },
                );
            }
        }
        if self.removed.len() > self.max_states * 4 {
            self.removed.clear();
        }
        encode(removed)
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
            .is_some());
        assert!(
            aw.apply(1, &update(&[(7, 1, "{\"a\":2}")]), now)
                .unwrap()
                .is_none(),
            "same clock"
        );
        assert!(aw
            .apply(1, &update(&[(7, 2, "{\"a\":3}")]), now)
            .unwrap()
            .is_some());
        let removal = decoded(aw.remove_owner(1).unwrap());
        assert_eq!(removal.clients[&ClientID::new(7)].clock, 2);
        assert_eq!(&*removal.clients[&ClientID::new(7)].json, "null");
        assert!(aw.is_empty());
        assert!(
            aw.apply(2, &update(&[(7, 2, "{\"a\":3}")]), now)
                .unwrap()
                .is_none(),
            "no resurrection at the removed clock"
        );
        assert!(aw
            .apply(2, &update(&[(7, 3, "{\"a\":4}")]), now)
            .unwrap()
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
            .is_some());
        assert!(aw
            .apply(1, &update(&[(1, 1, "null")]), now)
            .unwrap()
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
        assert!(aw.apply(2, &update(&[(3, 1, &state)]), now).is_err());
        // Shrinking one's own state makes room.
        aw.apply(1, &update(&[(2, 2, "{}")]), now).unwrap();
        assert_eq!(aw.total_bytes(), state.len() + 2);
        aw.apply(2, &update(&[(3, 1, &state)]), now).unwrap();
        aw.remove_owner(1);
        assert_eq!(aw.total_bytes(), state.len());
        assert!(aw.expire(now + AWARENESS_TIMEOUT).is_some());
        assert_eq!(aw.total_bytes(), 0);
    }
}
