//! Rate limiting for warnings about rejected input, so a misbehaving client cannot flood the
//! log: at most a fixed number per window, the rest counted and reported once.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

const PER_WINDOW: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct WarnLimiter {
    state: Mutex<(Instant, u32)>,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter {
            state: Mutex::new((Instant::now(), 0)),
        }
    }
}

impl WarnLimiter {
    /// Whether one more warning may be logged now.
    pub fn allow(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(state.0) >= WINDOW {
            if state.1 > PER_WINDOW {
                warn!(
                    suppressed = state.1 - PER_WINDOW,
                    "rejected-input warnings suppressed"
                );
            }
            *state = (now, 0);
        }
        state.1 += 1;
        state.1 <= PER_WINDOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_bounded_number_per_window() {
        let limiter = WarnLimiter::default();
        let allowed = (0..100).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, PER_WINDOW as usize);
    }
}
