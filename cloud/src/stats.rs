//! Counts every cloud call by operation and outcome (the metrics layer reads a snapshot), and
//! hands each attempt's duration to an observer the metrics layer sets (its histogram).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use crate::error::Outcome;

/// Called with (operation, seconds) after every attempt.
pub type LatencyObserver = Box<dyn Fn(&'static str, f64) + Send + Sync>;

#[derive(Default)]
pub struct CallStats {
    counts: Mutex<BTreeMap<(&'static str, Outcome), u64>>,
    observer: OnceLock<LatencyObserver>,
}

impl std::fmt::Debug for CallStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStats").field("counts", &self.counts).finish_non_exhaustive()
    }
}

impl CallStats {
    /// Sets the observer of attempt durations (once; later calls are ignored).
    pub fn observe_latency_with(&self, f: LatencyObserver) {
        let _ = self.observer.set(f);
    }

    pub fn latency(&self, op: &'static str, seconds: f64) {
        if let Some(f) = self.observer.get() {
            f(op, seconds);
        }
    }

    pub fn record(&self, op: &'static str, outcome: Outcome) {
        *self.counts.lock().expect("stats lock").entry((op, outcome)).or_default() += 1;
    }

    /// Every (operation, outcome) pair seen so far with its count.
    pub fn snapshot(&self) -> BTreeMap<(&'static str, Outcome), u64> {
        self.counts.lock().expect("stats lock").clone()
    }

    /// Calls of one operation, any outcome.
    pub fn calls(&self, op: &str) -> u64 {
        self.snapshot().iter().filter(|((o, _), _)| *o == op).map(|(_, n)| n).sum()
    }

    /// Calls with one outcome, any operation.
    pub fn with_outcome(&self, outcome: Outcome) -> u64 {
        self.snapshot().iter().filter(|((_, o), _)| *o == outcome).map(|(_, n)| n).sum()
    }
}
