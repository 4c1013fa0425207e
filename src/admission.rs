//! Who is let in: open connections in total and per client address. Each admitted TCP
//! connection holds a [`Slot`] in its stream ([`crate::transport::HttpStream`], then the
//! upgraded WebSocket's), so it counts exactly as long as its socket is open.
//!
//! Hand-rolled: a counter and a map, no allocation per connection.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Open connections, in total and per client, and their limits.
#[derive(Debug)]
pub struct Admission {
    open: AtomicUsize,
    max: usize,
    per_client: DashMap<IpAddr, usize>,
    max_per_client: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Full,
    Client,
}

impl Admission {
    pub fn new(max: usize, max_per_client: usize) -> Arc<Admission> {
        Arc::new(Admission {
            open: AtomicUsize::new(0),
            max,
            per_client: DashMap::new(),
            max_per_client,
        })
    }

    /// A place for one more connection of `client`, if both limits allow it.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Slot, Refusal> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .map_err(|_| Refusal::Full)?;
        {
            let mut open = self.per_client.entry(client).or_insert(0);
            if *open >= self.max_per_client {
                drop(open);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Client);
            }
            *open += 1;
        }
        Ok(Slot {
            admission: self.clone(),
            client,
        })
    }
}

/// One admitted connection's place, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Slot {
    /// The client the connection counts against.
    pub fn client(&self) -> IpAddr {
        self.client
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission
            .per_client
            .remove_if_mut(&self.client, |_, open| {
                *open -= 1;
                *open == 0
            });
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_holds_and_a_dropped_slot_makes_room() {
        let admission = Admission::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(a).unwrap();
        let second = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).err(), Some(Refusal::Client));
        let third = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).err(), Some(Refusal::Full));
        drop(first);
        let again = admission.admit(a).unwrap();
        // A refusal for the client's count gives its place in the total back.
        drop(third);
        assert_eq!(admission.admit(a).err(), Some(Refusal::Client));
        let other = admission.admit(b).unwrap();
        drop((second, again, other));
        assert!(admission.per_client.is_empty());
        assert_eq!(admission.open.load(Ordering::Relaxed), 0);
    }
}
