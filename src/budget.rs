//! One memory budget (`--max-memory`) for the bytes peers make the server hold: queued
//! outbound frames, incomplete inbound WebSocket messages, HTTP bodies being read, and
//! awareness states (reported by the sessions).
//!
//! Each holder (a connection, a request body) has an [`Account`]: what it holds is added to
//! the budget's total as it grows and given back as it shrinks or when the account is dropped
//! (RAII). When a growth would pass the limit, the costliest holders are shed first (their
//! account is marked and their owner woken: a WebSocket is closed 1013, a body answered 503)
//! until what stays fits; the others keep being served. The bytes of a shed holder count until
//! its owner lets them go, but are not shed twice.
//!
//! An account lives inside its owner's own shared allocation (a connection's outbox): the
//! budget knows each sheddable owner by a weak reference ([`Holder`]), so an idle connection
//! costs the budget no allocation of its own.
//!
//! Hand-rolled: a counter and a list, and the rule (who is shed) is this server's.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use slab::Slab;

/// The budget: a limit, what is held, and who holds it.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    /// The most one connection ever had queued.
    largest_queue: AtomicUsize,
    shed_total: AtomicU64,
    /// The sheddable holders; each account knows its entry and removes it when dropped.
    holders: Mutex<Slab<Weak<dyn Holder>>>,
}

/// An owner of an account that the budget may shed.
pub trait Holder: Send + Sync {
    fn account(&self) -> &Account;
    /// The owner was shed: wake whoever must end it.
    fn wake(&self);
}

/// What the budget holds now, for `/health` and `/api/process`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BudgetUse {
    pub limit_bytes: usize,
    pub used_bytes: usize,
    pub peak_bytes: usize,
    pub largest_queue_bytes: usize,
    /// Holders shed since the start (connections closed 1013, bodies answered 503).
    pub shed: u64,
}

/// The growth was refused: this holder is the costliest and was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            largest_queue: AtomicUsize::new(0),
            shed_total: AtomicU64::new(0),
            holders: Mutex::new(Slab::new()),
        })
    }

    /// A budget nothing is ever shed from (tests of other things).
    pub fn unlimited() -> Arc<Budget> {
        Budget::new(usize::MAX)
    }

    /// A new account, holding nothing yet. Its bytes count; it can be shed once its owner,
    /// holding it in an `Arc`, is registered ([`Budget::register`]). One never registered is
    /// never shed (a session's awareness states: bounded per session, and no one peer's).
    pub fn account(self: &Arc<Self>) -> Account {
        Account::new(self.clone())
    }

    /// An account of its own, registered: shed, its owner learns it at its next growth.
    pub fn standalone_account(self: &Arc<Self>) -> Arc<Account> {
        let account = Arc::new(self.account());
        let holder: Arc<dyn Holder> = account.clone();
        self.register(&holder);
        account
    }

    /// Makes `holder` sheddable, until its account is dropped.
    pub fn register(&self, holder: &Arc<dyn Holder>) {
        let account = holder.account();
        debug_assert!(std::ptr::eq(&*account.budget, self));
        let mut holders = self.holders();
        let entry = holders.insert(Arc::downgrade(holder));
        // Past `u32::MAX` holders (never: each is a connection or a request) it stays unshed.
        match u32::try_from(entry) {
            Ok(entry) if entry != Account::UNREGISTERED => {
                account.entry.store(entry, Ordering::Relaxed);
            }
            _ => {
                holders.remove(entry);
            }
        }
    }

    pub fn usage(&self) -> BudgetUse {
        BudgetUse {
            limit_bytes: self.limit,
            used_bytes: self.used.load(Ordering::Relaxed),
            peak_bytes: self.peak.load(Ordering::Relaxed),
            largest_queue_bytes: self.largest_queue.load(Ordering::Relaxed),
            shed: self.shed_total.load(Ordering::Relaxed),
        }
    }

    /// Records the size of a connection's queue (the largest is reported).
    pub fn note_queue(&self, bytes: usize) {
        self.largest_queue.fetch_max(bytes, Ordering::Relaxed);
    }

    fn holders(&self) -> MutexGuard<'_, Slab<Weak<dyn Holder>>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The total passed the limit after `grower` grew: sheds the costliest holders not shed
    /// yet until the rest fits. `Err` when `grower` itself is among them.
    fn shed_over_limit(&self, grower: &Account) -> Result<(), OverBudget> {
        let holders = self.holders();
        // Dropped after the lock: the last reference to a holder may be one of these, and
        // its account's drop takes the lock.
        let live: Vec<Arc<dyn Holder>> = holders
            .iter()
            .filter_map(|(_, holder)| holder.upgrade())
            .collect();
        let used = self.used.load(Ordering::Relaxed);
        let being_freed: usize = live
            .iter()
            .map(|h| h.account())
            .filter(|a| a.is_shed())
            .map(Account::bytes)
            .sum();
        let mut held = used.saturating_sub(being_freed);
        let mut candidates: Vec<(usize, &Arc<dyn Holder>)> = live
            .iter()
            .filter(|h| !h.account().is_shed())
            .map(|h| (h.account().bytes(), h))
            .collect();
        candidates.sort_unstable_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
        let mut result = Ok(());
        for (bytes, holder) in candidates {
            if held <= self.limit || bytes == 0 {
                break;
            }
            let account = holder.account();
            account.shed.store(true, Ordering::Relaxed);
            holder.wake();
            self.shed_total.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("collab_budget_shed_total").increment(1);
            held -= bytes;
            if std::ptr::eq(account, grower) {
                result = Err(OverBudget);
            }
        }
        drop(holders);
        drop(live);
        result
    }
}

/// One holder's bytes in the budget; given back when dropped.
#[derive(Debug)]
pub struct Account {
    budget: Arc<Budget>,
    bytes: AtomicUsize,
    /// Its entry among the budget's holders, once registered.
    entry: AtomicU32,
    shed: AtomicBool,
}

impl Account {
    const UNREGISTERED: u32 = u32::MAX;

    fn new(budget: Arc<Budget>) -> Account {
        Account {
            budget,
            bytes: AtomicUsize::new(0),
            entry: AtomicU32::new(Account::UNREGISTERED),
            shed: AtomicBool::new(false),
        }
    }

    /// Adds `n` bytes. `Err` when the budget is over its limit and this holder is the
    /// costliest (it is then shed: [`Account::is_shed`]); the bytes are counted either way,
    /// until the owner lets them go.
    pub fn grow(&self, n: usize) -> Result<(), OverBudget> {
        if n == 0 {
            return if self.is_shed() {
                Err(OverBudget)
            } else {
                Ok(())
            };
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        let used = self.budget.used.fetch_add(n, Ordering::Relaxed) + n;
        self.budget.peak.fetch_max(used, Ordering::Relaxed);
        if self.is_shed() {
            return Err(OverBudget);
        }
        if used > self.budget.limit {
            return self.budget.shed_over_limit(self);
        }
        Ok(())
    }

    /// Gives back `n` bytes.
    pub fn shrink(&self, n: usize) {
        let n = n.min(self.bytes.load(Ordering::Relaxed));
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Sets what this holder holds to `bytes`.
    pub fn set(&self, bytes: usize) -> Result<(), OverBudget> {
        let held = self.bytes.load(Ordering::Relaxed);
        if bytes >= held {
            self.grow(bytes - held)
        } else {
            self.shrink(held - bytes);
            Ok(())
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the budget shed this holder (its owner must end it).
    pub fn is_shed(&self) -> bool {
        self.shed.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

/// An account of its own ([`Budget::standalone_account`]): its owner polls it.
impl Holder for Account {
    fn account(&self) -> &Account {
        self
    }

    fn wake(&self) {}
}

impl Drop for Account {
    fn drop(&mut self) {
        self.shrink(self.bytes());
        let entry = *self.entry.get_mut();
        if entry != Account::UNREGISTERED {
            self.budget.holders().try_remove(entry as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_given_back_when_an_account_shrinks_or_drops() {
        let budget = Budget::new(100);
        let a = budget.account();
        a.grow(30).unwrap();
        a.set(50).unwrap();
        assert_eq!(budget.usage().used_bytes, 50);
        a.shrink(20);
        assert_eq!(budget.usage().used_bytes, 30);
        drop(a);
        assert_eq!(budget.usage().used_bytes, 0);
        assert_eq!(budget.usage().peak_bytes, 50);
    }

    #[test]
    fn the_costliest_holders_are_shed_first_until_the_rest_fits() {
        let budget = Budget::new(100);
        let (big, middle, small) = (
            budget.standalone_account(),
            budget.standalone_account(),
            budget.standalone_account(),
        );
        big.grow(50).unwrap();
        middle.grow(30).unwrap();
        small.grow(10).unwrap();
        // 110 > 100: shedding `big` (50) is enough; the grower stays.
        assert_eq!(small.grow(20), Ok(()));
        assert!(big.is_shed());
        assert!(!middle.is_shed() && !small.is_shed());
        // What is being freed is not shed again, nor counted against the others.
        assert_eq!(middle.grow(5), Ok(()));
        assert!(!small.is_shed());
        drop(big);
        // The grower itself is the costliest: it is refused.
        assert_eq!(middle.grow(100), Err(OverBudget));
        assert!(middle.is_shed() && !small.is_shed());
        assert_eq!(budget.usage().shed, 2);
        // An account never registered counts against the limit but is never shed.
        let unregistered = budget.account();
        assert_eq!(unregistered.grow(200), Ok(()));
        assert!(small.is_shed() && !unregistered.is_shed());
    }

    /// An owner with its account inside, as a connection's outbox holds one.
    struct Owner {
        account: Account,
        woken: AtomicBool,
    }

    impl Holder for Owner {
        fn account(&self) -> &Account {
            &self.account
        }

        fn wake(&self) {
            self.woken.store(true, Ordering::Relaxed);
        }
    }

    fn owner(budget: &Arc<Budget>) -> Arc<Owner> {
        let owner = Arc::new(Owner {
            account: budget.account(),
            woken: AtomicBool::new(false),
        });
        let holder: Arc<dyn Holder> = owner.clone();
        budget.register(&holder);
        owner
    }

    #[test]
    fn a_shed_owner_is_woken_and_a_dropped_one_is_forgotten() {
        let budget = Budget::new(100);
        let (big, small) = (owner(&budget), owner(&budget));
        big.account.grow(60).unwrap();
        small.account.grow(30).unwrap();
        assert_eq!(small.account.grow(20), Ok(()));
        assert!(big.account.is_shed() && big.woken.load(Ordering::Relaxed));
        assert!(!small.woken.load(Ordering::Relaxed));
        drop(big);
        assert_eq!(budget.holders().len(), 1);
        assert_eq!(budget.usage().used_bytes, 50);
        // An account never registered is counted, never shed.
        let unregistered = budget.account();
        assert_eq!(unregistered.grow(500), Ok(()));
        assert!(small.account.is_shed() && !unregistered.is_shed());
        drop((small, unregistered));
        assert!(budget.holders().is_empty());
        assert_eq!(budget.usage().used_bytes, 0);
    }
}
