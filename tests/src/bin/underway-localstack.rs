//! Holds one LocalStack for a whole test run: starts it, prints `endpoint=<url>` and waits; when
//! this process ends (SIGTERM, SIGINT, or killed) its watchdog takes LocalStack down.

use std::time::Duration;

fn main() {
    let log = std::env::args().nth(1).unwrap_or_else(|| "/tmp/underway-localstack.log".into());
    match underway_tests::localstack::start(std::process::id(), std::path::Path::new(&log)) {
        Ok((ls, _child)) => {
            println!("endpoint={}", ls.endpoint);
            let pgid = ls.pid.expect("started here");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            });
            underway_tests::localstack::stop_group(pgid);
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(e) => {
            eprintln!("underway-localstack: {e} (log: {log})");
            std::process::exit(1);
        }
    }
}
