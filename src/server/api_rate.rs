//! The HTTP API's request rate per client address (`--api-rate`, `--api-burst`): a token
//! bucket per client, the core's [`Buckets`] (one of its two kinds is used); over it, 429 with
//! `Retry-After`.
//!
//! The table is bounded: a client whose bucket has refilled is as good as absent and is
//! dropped when the table is full; when every entry is still refilling, a new client waits
//! (429) until one has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use collab_core::session::{Buckets, Cost, Rate, Rates};

use super::listener::ClientAddr;
use super::AppState;

/// Most clients tracked at once.
const MAX_CLIENTS: usize = 16 * 1024;
/// Least time between two sweeps of a full table (a sweep reads every entry).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub struct ApiRate {
    rates: Rates,
    /// How long an unused bucket takes to fill up again: then it can be forgotten.
    refill: Duration,
    table: Mutex<Table>,
}

struct Table {
    /// Each client's buckets and when it last asked.
    clients: HashMap<IpAddr, (Buckets, Instant)>,
    swept: Option<Instant>,
}

impl ApiRate {
    pub fn new(rate: Rate) -> ApiRate {
        ApiRate {
            rates: Rates {
                update: rate,
                request: rate,
            },
            refill: Duration::from_secs_f64(rate.burst / rate.per_second),
            table: Mutex::new(Table {
                clients: HashMap::new(),
                swept: None,
            }),
        }
    }

    /// Takes one request's token for `client`.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if !table.clients.contains_key(&client) && table.clients.len() >= MAX_CLIENTS {
            if table
                .swept
                .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_INTERVAL)
            {
                return false;
            }
            table.swept = Some(now);
            let refill = self.refill;
            table
                .clients
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < refill);
            if table.clients.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let (buckets, last) = table
            .clients
            .entry(client)
            .or_insert_with(|| (Buckets::new(&self.rates, now), now));
        *last = now;
        buckets.take(Cost::Request, &self.rates, now)
    }

    /// Whole seconds until one more token (at least 1).
    fn retry_after(&self) -> u64 {
        (1.0 / self.rates.request.per_second).ceil().max(1.0) as u64
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clients
            .len()
    }
}

/// Middleware on the `/api` routes.
pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Every connection the listener serves has a slot; a request without one (none today)
    // is not limited.
    if let Some(&ClientAddr(client)) = request.extensions().get::<ClientAddr>() {
        if !state.api_rate.allow(client, Instant::now()) {
            if state.rejected_warnings.allow() {
                tracing::warn!(%client, "HTTP API rate exceeded: 429");
            }
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this address",
            )
                .into_response();
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(state.api_rate.retry_after()));
            return response;
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(i.to_be_bytes())
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let rate = ApiRate::new(Rate {
            per_second: 1.0,
            burst: 3.0,
        });
        let now = Instant::now();
        let allowed = |client| (0..10).filter(|_| rate.allow(client, now)).count();
        assert_eq!(allowed(ip(1)), 3);
        assert_eq!(allowed(ip(2)), 3);
        assert!(rate.allow(ip(1), now + Duration::from_secs(1)));
        assert_eq!(rate.retry_after(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_clients() {
        let rate = ApiRate::new(Rate {
            per_second: 1.0,
            burst: 2.0,
        });
        let start = Instant::now();
        for i in 0..MAX_CLIENTS as u32 {
            assert!(rate.allow(ip(i), start));
        }
        // Every entry is still refilling: a newcomer waits, and the table does not grow.
        assert!(!rate.allow(ip(u32::MAX), start));
        assert_eq!(rate.tracked(), MAX_CLIENTS);
        // Once they have refilled they are forgotten, and the newcomer is served.
        let later = start + Duration::from_secs(3);
        assert!(rate.allow(ip(u32::MAX), later));
        assert_eq!(rate.tracked(), 1);
    }
}
