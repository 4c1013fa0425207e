//! A memory store with a test's hook around each operation: a test that needs a slow or
//! held store says only what differs, and every `Store` method is forwarded once, here.

use std::future::Future;
use std::pin::Pin;

use optiverse_collab::store::memory::MemoryStore;
use optiverse_collab::store::{SessionMeta, Store, StoreFuture, StoredSession};

/// Which store operation a hook is called for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Load,
    Append,
    Compact,
    Flush,
}

/// What a hook makes the operation wait for before it runs.
pub type Wait = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a test does around the store's operations. Both default to nothing.
pub trait StoreHook: Send + Sync + 'static {
    /// Called when the operation is asked for; the operation runs once the returned future
    /// is done (a held load, a slow disk).
    fn before(&self, _op: StoreOp) -> Wait {
        Box::pin(std::future::ready(()))
    }

    /// Called once the operation is done.
    fn after(&self, _op: StoreOp) {}
}

/// A [`MemoryStore`] whose operations go through `hook`.
pub struct HookStore<H> {
    inner: MemoryStore,
    pub hook: H,
}

impl<H: StoreHook> HookStore<H> {
    pub fn new(hook: H) -> HookStore<H> {
        HookStore {
            inner: MemoryStore::new(),
            hook,
        }
    }

    /// Runs `operation` on the inner store once the hook's wait is over. The memory store
    /// acts when called, not when polled, so the operation is only called after the wait.
    fn hooked<'a, T: Send + 'a>(
        &'a self,
        op: StoreOp,
        operation: impl FnOnce(&'a MemoryStore) -> StoreFuture<'a, T> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        let wait = self.hook.before(op);
        Box::pin(async move {
            wait.await;
            let result = operation(&self.inner).await;
            self.hook.after(op);
            result
        })
    }
}

impl<H: StoreHook> Store for HookStore<H> {
    fn load(&self, session: &str) -> StoreFuture<'_, Option<StoredSession>> {
        let session = session.to_owned();
        self.hooked(StoreOp::Load, move |store| store.load(&session))
    }

    fn append(
        &self,
        session: &str,
        updates: Vec<Vec<u8>>,
        meta: SessionMeta,
    ) -> StoreFuture<'_, u64> {
        let session = session.to_owned();
        self.hooked(StoreOp::Append, move |store| {
            store.append(&session, updates, meta)
        })
    }

    fn compact(
        &self,
        session: &str,
        snapshot: Vec<u8>,
        upto: u64,
        meta: SessionMeta,
    ) -> StoreFuture<'_, ()> {
        let session = session.to_owned();
        self.hooked(StoreOp::Compact, move |store| {
            store.compact(&session, snapshot, upto, meta)
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.hooked(StoreOp::Flush, |store| store.flush())
    }
}
