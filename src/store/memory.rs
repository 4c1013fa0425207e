//! `--store memory`: keeps sessions in process memory only (tests, throwaway servers).

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession};

/// A session's metadata and its updates with their positions.
type Entry = (SessionMeta, Vec<(u64, Vec<u8>)>);

#[derive(Debug, Default)]
pub struct MemoryStore {
    sessions: DashMap<String, Entry>,
    next_seq: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn ready<T: Send + 'static>(value: T) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(Ok::<T, StoreError>(value)))
}

impl Store for MemoryStore {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        ready(self.sessions.get(session).map(|entry| {
            let (meta, updates) = entry.value();
            StoredSession {
                updates: updates.iter().map(|(_, u)| u.clone()).collect(),
                meta: meta.clone(),
                last_seq: updates.last().map_or(0, |(seq, _)| *seq),
            }
        }))
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        let mut entry = self.sessions.entry(session.to_owned()).or_default();
        let mut last = entry.1.last().map_or(0, |(seq, _)| *seq);
        for update in updates {
            last = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
            entry.1.push((last, update));
        }
        entry.0 = meta;
        ready(last)
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let mut entry = self.sessions.entry(session.to_owned()).or_default();
        entry.1.retain(|(seq, _)| *seq > upto);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        entry.1.push((seq, snapshot));
        entry.0 = meta;
        ready(())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        ready(())
    }
}
