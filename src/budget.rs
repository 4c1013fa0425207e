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
//! Hand-rolled: a counter and a list, and the rule (who is shed) is this server's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::task::AtomicWaker;

/// The budget: a limit, what is held, and who holds it.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    /// The most one connection ever had queued.
    largest_queue: AtomicUsize,
    shed_total: AtomicU64,
    holders: Mutex<HashMap<u64, Arc<Holder>>>,
    next_id: AtomicU64,
}

/// What one account shares with the budget.
#[derive(Debug, Default)]
struct Holder {
    /// Counted but never shed (a session's awareness states: bounded per session, and no
    /// one peer's).
    fixed: bool,
    bytes: AtomicUsize,
    shed: AtomicBool,
    /// The owner's task, woken when it is shed.
    waker: AtomicWaker,
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
            holders: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// A budget nothing is ever shed from (tests of other things).
    pub fn unlimited() -> Arc<Budget> {
        Budget::new(usize::MAX)
    }

    /// A new holder of bytes, holding none yet.
    pub fn account(self: &Arc<Self>) -> Account {
        self.open(false)
    }

    /// A holder whose bytes count but which is never shed.
    pub fn fixed_account(self: &Arc<Self>) -> Account {
        self.open(true)
    }

    fn open(self: &Arc<Self>, fixed: bool) -> Account {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let holder = Arc::new(Holder {
            fixed,
            ..Holder::default()
        });
        self.holders().insert(id, holder.clone());
        Account {
            budget: self.clone(),
            id,
            holder,
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

    fn holders(&self) -> MutexGuard<'_, HashMap<u64, Arc<Holder>>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The total passed the limit after `grower` grew: sheds the costliest holders not shed
    /// yet until the rest fits. `Err` when `grower` itself is among them.
    fn shed_over_limit(&self, grower: u64) -> Result<(), OverBudget> {
        let holders = self.holders();
        let used = self.used.load(Ordering::Relaxed);
        let mut live: Vec<(u64, usize, &Arc<Holder>)> = holders
            .iter()
            .filter(|(_, h)| !h.fixed && !h.shed.load(Ordering::Relaxed))
            .map(|(id, h)| (*id, h.bytes.load(Ordering::Relaxed), h))
            .collect();
        let being_freed: usize = holders
            .values()
            .filter(|h| h.shed.load(Ordering::Relaxed))
            .map(|h| h.bytes.load(Ordering::Relaxed))
            .sum();
        let mut held = used.saturating_sub(being_freed);
        live.sort_unstable_by_key(|(_, bytes, _)| std::cmp::Reverse(*bytes));
        let mut result = Ok(());
        for (id, bytes, holder) in live {
            if held <= self.limit || bytes == 0 {
                break;
            }
            holder.shed.store(true, Ordering::Relaxed);
            holder.waker.wake();
            self.shed_total.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("collab_budget_shed_total").increment(1);
            held -= bytes;
            if id == grower {
                result = Err(OverBudget);
            }
        }
        result
    }
}

/// One holder's bytes in the budget; given back when dropped.
#[derive(Debug)]
pub struct Account {
    budget: Arc<Budget>,
    id: u64,
    holder: Arc<Holder>,
}

impl Account {
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
        self.holder.bytes.fetch_add(n, Ordering::Relaxed);
        let used = self.budget.used.fetch_add(n, Ordering::Relaxed) + n;
        self.budget.peak.fetch_max(used, Ordering::Relaxed);
        if self.is_shed() {
            return Err(OverBudget);
        }
        if used > self.budget.limit {
            return self.budget.shed_over_limit(self.id);
        }
        Ok(())
    }

    /// Gives back `n` bytes.
    pub fn shrink(&self, n: usize) {
        let n = n.min(self.holder.bytes.load(Ordering::Relaxed));
        self.holder.bytes.fetch_sub(n, Ordering::Relaxed);
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Sets what this holder holds to `bytes`.
    pub fn set(&self, bytes: usize) -> Result<(), OverBudget> {
        let held = self.holder.bytes.load(Ordering::Relaxed);
        if bytes >= held {
            self.grow(bytes - held)
        } else {
            self.shrink(held - bytes);
            Ok(())
        }
    }

    pub fn bytes(&self) -> usize {
        self.holder.bytes.load(Ordering::Relaxed)
    }

    /// Whether the budget shed this holder (its owner must end it).
    pub fn is_shed(&self) -> bool {
        self.holder.shed.load(Ordering::Relaxed)
    }

    /// Wakes `waker` when this holder is shed.
    pub fn register(&self, waker: &std::task::Waker) {
        self.holder.waker.register(waker);
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.shrink(self.bytes());
        self.budget.holders().remove(&self.id);
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
        let (big, middle, small) = (budget.account(), budget.account(), budget.account());
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
        // Fixed bytes count against the limit but are never shed.
        let fixed = budget.fixed_account();
        assert_eq!(fixed.grow(200), Ok(()));
        assert!(small.is_shed() && !fixed.is_shed());
    }
}
