//! Wall-clock milliseconds: cooldowns and timestamps survive a restart, so they use Unix time.
//! And the jitter of periodic work.

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A factor between 0.5 and 1.5, drawn anew for each wait of a periodic describe (the ENI mode's
/// leaked-ENI sweep and drift re-check, VPC-route mode's route check): nodes that started
/// together do not look together for ever. In step, their describes came together, were
/// throttled, and each throttled describe re-phased the mutating token of a node still growing
/// (the simulated 1,000-node wave's last node: 1.39–1.45× the floor in step, 1.15× jittered;
/// docs/benchmarks.md).
pub fn jitter() -> f64 {
    0.5 + fastrand::f64()
}
