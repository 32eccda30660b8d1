//! Network namespaces for the test world, through iproute2 (test infrastructure, not the product's
//! datapath, which goes through netlink in `routes/`).

use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, Output, Stdio};

use crate::HarnessError;

fn check(what: &str, out: Output) -> Result<Output, HarnessError> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(HarnessError::Command(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// `ip <args>` in the root namespace.
pub fn ip(args: &[&str]) -> Result<Output, HarnessError> {
    check(&format!("ip {}", args.join(" ")), Command::new("ip").args(args).output()?)
}

/// `ip -n <ns> <args>`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<Output, HarnessError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Runs `ip -n <ns> -batch -` with the given lines; `-force` goes on after an error and reports it.
pub fn ip_batch(ns: &str, lines: &[String]) -> Result<(), HarnessError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", ns, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(lines.join("\n").as_bytes())?;
    check(&format!("ip -n {ns} -batch ({} lines)", lines.len()), child.wait_with_output()?).map(|_| ())
}

/// A command inside a namespace (`ip netns exec`).
pub fn exec(ns: &str, argv: &[&str]) -> Result<Output, HarnessError> {
    Ok(Command::new("ip").args(["netns", "exec", ns]).args(argv).output()?)
}

/// Loads an nftables ruleset inside a namespace.
pub fn nft(ns: &str, ruleset: &str) -> Result<(), HarnessError> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(ruleset.as_bytes())?;
    check(&format!("nft -f in {ns}"), child.wait_with_output()?).map(|_| ())
}

/// Writes a sysctl inside a namespace.
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), HarnessError> {
    check(&format!("sysctl {key}={value} in {ns}"), exec(ns, &["sysctl", "-qw", &format!("{key}={value}")])?)
        .map(|_| ())
}

pub fn add_ns(ns: &str) -> Result<(), HarnessError> {
    ip(&["netns", "add", ns]).map(|_| ())
}

/// Deletes a namespace; its links go with it (and the far ends of its veth pairs). Absent is fine.
pub fn del_ns(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
}

pub fn list_ns() -> Vec<String> {
    ip(&["netns", "list"])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that has entered `ns`: sockets made there stay in that namespace
/// after the thread ends. The calling thread never changes namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, HarnessError> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T, HarnessError> {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| HarnessError::Command(format!("setns {path}: {e}")))?;
        Ok(f())
    })
    .join()
    .map_err(|_| HarnessError::Command("namespace thread panicked".into()))?
}

/// A throwaway namespace named `uwt-<pid>-x<n>-<role>`, deleted on drop (also when a test
/// panics); `world::reap_orphans` removes those of killed processes.
pub struct TempNs(pub String);

impl TempNs {
    pub fn new(role: &str) -> Result<Self, HarnessError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("uwt-{}-x{n}-{role}", std::process::id());
        add_ns(&name)?;
        Ok(TempNs(name))
    }
    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
    /// `sh -c cmd` inside; (success, stdout + stderr).
    pub fn sh(&self, cmd: &str) -> (bool, String) {
        match exec(&self.0, &["sh", "-c", cmd]) {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for TempNs {
    fn drop(&mut self) {
        del_ns(&self.0);
    }
}
