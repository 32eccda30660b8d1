//! Wall-clock milliseconds: cooldowns and timestamps survive a restart, so they use Unix time.

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
