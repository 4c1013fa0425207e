//! `--store memory`: keeps sessions in process memory only (tests, throwaway servers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use collab_core::protocol::json::timestamp;
use dashmap::DashMap;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession, StoredSummary};

/// One stored session.
#[derive(Debug, Default)]
struct Entry {
    meta: SessionMeta,
    /// Its updates with their positions.
    updates: Vec<(u64, Vec<u8>)>,
    /// When an update was last appended (a compaction changes nothing the document holds).
    last_change: Option<SystemTime>,
}

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
        ready(self.sessions.get(session).map(|entry| StoredSession {
            updates: entry.updates.iter().map(|(_, u)| u.clone()).collect(),
            meta: entry.meta.clone(),
            last_seq: entry.updates.last().map_or(0, |(seq, _)| *seq),
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
        let mut last = entry.updates.last().map_or(0, |(seq, _)| *seq);
        if !updates.is_empty() {
            entry.last_change = Some(SystemTime::now());
        }
        for update in updates {
            last = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
            entry.updates.push((last, update));
        }
        entry.meta = meta;
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
        entry.updates.retain(|(seq, _)| *seq > upto);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        entry.updates.push((seq, snapshot));
        entry.meta = meta;
        ready(())
    }

    fn list(&self) -> StoreFuture<'_, Vec<StoredSummary>> {
        let mut list: Vec<StoredSummary> = self
            .sessions
            .iter()
            .map(|entry| StoredSummary {
                id: entry.key().clone(),
                stored_bytes: entry.updates.iter().map(|(_, u)| u.len() as u64).sum(),
                last_change: entry.last_change.map(timestamp),
            })
            .collect();
        list.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        ready(list)
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
        self.sessions.retain(|id, entry| {
            let old = entry.last_change.is_none_or(|at| at < cutoff) && !keep.contains(id);
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
    use std::time::Duration;

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

    #[tokio::test]
    async fn lists_what_is_stored_with_its_size_and_last_change() {
        let store = MemoryStore::new();
        assert!(store.list().await.unwrap().is_empty());
        let meta = SessionMeta { initialized: true };
        store
            .append("b", vec![vec![1; 10]], meta.clone())
            .await
            .unwrap();
        let upto = store
            .append("b", vec![vec![2; 5]], meta.clone())
            .await
            .unwrap();
        store.append("a", Vec::new(), meta.clone()).await.unwrap();
        let list = store.list().await.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].id.as_str(), list[0].stored_bytes), ("a", 0));
        assert_eq!(list[0].last_change, None, "metadata alone is no change");
        assert_eq!((list[1].id.as_str(), list[1].stored_bytes), ("b", 15));
        let changed = list[1].last_change.clone().expect("b changed");
        assert!(changed.ends_with('Z') && changed.len() == 24, "{changed}");
        // A compaction replaces the log; the last change stays the last update's.
        store.compact("b", vec![3; 7], upto, meta).await.unwrap();
        let list = store.list().await.unwrap();
        assert_eq!(list[1].stored_bytes, 7);
        assert_eq!(list[1].last_change.as_deref(), Some(changed.as_str()));
    }
}
