//! `--store memory`: keeps sessions in process memory only (tests, throwaway servers).

use dashmap::DashMap;

use super::{SessionMeta, Store, StoreError, StoreFuture, StoredSession};

#[derive(Debug, Default)]
pub struct MemoryStore {
    sessions: DashMap<String, StoredSession>,
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
        ready(self.sessions.get(session).map(|s| s.clone()))
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let mut entry = self.sessions.entry(session.to_owned()).or_default();
        entry.updates.extend(updates);
        entry.meta = meta;
        ready(())
    }

    fn compact(&self, session: &str, snapshot: Vec<u8>, meta: SessionMeta) -> StoreFuture<'_, ()> {
        self.sessions.insert(
            session.to_owned(),
            StoredSession {
                updates: vec![snapshot],
                meta,
            },
        );
        ready(())
    }

    fn list(&self) -> StoreFuture<'_, Vec<String>> {
        ready(self.sessions.iter().map(|e| e.key().clone()).collect())
    }

    fn delete(&self, session: &str) -> StoreFuture<'_, ()> {
        self.sessions.remove(session);
        ready(())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        ready(())
    }
}
