//! Latency samples and their percentiles.

use std::time::Duration;

use serde_json::{json, Value};

#[derive(Debug, Default)]
pub struct Latencies {
    micros: Vec<u32>,
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        self.micros
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    pub fn summary_ms(&mut self) -> Value {
        if self.micros.is_empty() {
            return Value::Null;
        }
        self.micros.sort_unstable();
        let at = |p: f64| {
            let i = ((self.micros.len() - 1) as f64 * p).round() as usize;
            f64::from(self.micros[i]) / 1000.0
        };
        json!({"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0), "samples": self.micros.len()})
    }
}
