//! `--store memory`: keeps sessions in process memory only (tests, throwaway servers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession};

/// A session's metadata, its updates with their positions, and when it was last written.
type Entry = (SessionMeta, Vec<(u64, Vec<u8>)>, Option<SystemTime>);

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
            let (meta, updates, _) = entry.value();
            StoredSession {
                updates: updates.iter().map(|(_, u)| u.clone()).collect(),
                meta: meta.clone(),
                last_seq: updates.last().map_or(0, |(seq, _)| *seq),
            }
        }))
    }

    fn contains(&self, session: &str) -> StoreFuture<'_, bool> {
        ready(self.sessions.contains_key(session))
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
        entry.2 = Some(SystemTime::now());
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
        entry.2 = Some(SystemTime::now());
        ready(())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        ready(())
    }

    fn remove_untouched(
        &self,
        cutoff: SystemTime,
        keep: Vec<String>,
    ) -> StoreFuture<'_, Vec<String>> {
        let mut removed = Vec::new();
        self.sessions.retain(|id, (_, _, written)| {
            let old = written.is_none_or(|at| at < cutoff) && !keep.contains(id);
            if old {
                removed.push(id.clone());
            }
            !old
        });
        ready(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[tokio::test]
    async fn retention_keeps_recent_and_kept_sessions() {
        let store = MemoryStore::new();
        let before = SystemTime::now() - Duration::from_secs(1);
        for session in ["a", "b"] {
            store
                .append(session, vec![vec![1]], SessionMeta::default())
                .await
                .unwrap();
        }
        let after = SystemTime::now() + Duration::from_secs(1);
        assert!(store
            .remove_untouched(before, vec![])
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .remove_untouched(after, vec!["b".into()])
                .await
                .unwrap(),
            ["a"]
        );
        assert!(!store.contains("a").await.unwrap());
        assert!(store.contains("b").await.unwrap());
    }
}
