//! Summarises a run's EC2 front log (`UNDERWAY_FRONT_LOG`, one JSON line per request of every
//! test's front): requests, outcomes, refusals by rule, and the busiest second of each account
//! against EC2's account budget. Exits 1 when any request was refused by a rule its test did not
//! ask to provoke: ipamd (or a test) made a request AWS would refuse.
//!
//! `underway-front-report <log>`

use std::collections::BTreeMap;
use std::process::ExitCode;

use underway_tests::front::{AWS_MUTATING, AWS_NON_MUTATING, peak_in_window};

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: underway-front-report <front log>");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            eprintln!("underway-front-report: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut unprovoked: Vec<String> = Vec::new();
    // account → (mutating times, non-mutating times) of requests that reached LocalStack.
    let mut spent: BTreeMap<String, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    let mut total = 0u64;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        total += 1;
        let outcome = v["outcome"].as_str().unwrap_or("?").to_string();
        if v["rule"].is_string() && v["provoked"] == false {
            unprovoked.push(format!(
                "{} {} from {} ({}): refused by {}",
                v["account"].as_str().unwrap_or("?"),
                v["action"].as_str().unwrap_or("?"),
                v["node"].as_str().unwrap_or("?"),
                v["test"].as_str().unwrap_or("?"),
                v["rule"].as_str().unwrap_or("?"),
            ));
        }
        if outcome.starts_with("forwarded") || outcome == "fault:reset-after" {
            let e = spent.entry(v["account"].as_str().unwrap_or("?").to_string()).or_default();
            let t = v["t_ms"].as_u64().unwrap_or(0);
            if v["mutating"] == true { e.0.push(t) } else { e.1.push(t) }
        }
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    let refused: u64 = outcomes.iter().filter(|(k, _)| k.starts_with("refused:")).map(|(_, n)| n).sum();
    println!("== EC2 front: {total} requests from {} accounts, {refused} refused by a rule", spent.len());
    for (k, n) in &outcomes {
        println!("   {k:<40} {n}");
    }
    let (mut peak_m, mut peak_d) = ((0, String::new()), (0, String::new()));
    for (acct, (m, d)) in &spent {
        let (pm, pd) = (peak_in_window(m, 1000), peak_in_window(d, 1000));
        if pm > peak_m.0 {
            peak_m = (pm, acct.clone());
        }
        if pd > peak_d.0 {
            peak_d = (pd, acct.clone());
        }
    }
    println!(
        "   busiest second of one account: {} mutating (account {}; budget: bucket {}, refill {}/s), {} describe (account {}; bucket {}, {}/s)",
        peak_m.0,
        peak_m.1,
        AWS_MUTATING.size,
        AWS_MUTATING.refill,
        peak_d.0,
        peak_d.1,
        AWS_NON_MUTATING.size,
        AWS_NON_MUTATING.refill
    );
    println!("   unprovoked refusals: {}", unprovoked.len());
    if unprovoked.is_empty() {
        return ExitCode::SUCCESS;
    }
    for u in &unprovoked {
        println!("   UNPROVOKED {u}");
    }
    println!("== a request AWS would refuse was made without the test asking for it");
    ExitCode::FAILURE
}
