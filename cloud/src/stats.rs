//! Counts every cloud call by operation and outcome (the metrics layer reads a snapshot).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::Outcome;

#[derive(Debug, Default)]
pub struct CallStats {
    counts: Mutex<BTreeMap<(&'static str, Outcome), u64>>,
}

impl CallStats {
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
