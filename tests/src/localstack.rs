//! LocalStack on loopback, shared by every test of a run.
//!
//! `UNDERWAY_LOCALSTACK_ENDPOINT` names a LocalStack the test command already started (one per
//! run, see `tests/run`); without it the first test of a process starts one for that process.
//! The flags are the ones EMULATOR-NOTES found necessary on a host without Docker.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;

use crate::HarnessError;
use crate::front::Front;

/// The pins that make LocalStack start on Python 3.11 (EMULATOR-NOTES).
pub const PIP_PACKAGES: &[&str] = &[
    "localstack-core[base-runtime]==4.14.0",
    "moto-ext",
    "cbor2<6",
    "pyopenssl<25",
    "cryptography<45",
    "service-identity",
];

pub const ENDPOINT_ENV: &str = "UNDERWAY_LOCALSTACK_ENDPOINT";
pub const VENV_ENV: &str = "UNDERWAY_VENV";
pub const DEFAULT_VENV: &str = "/var/tmp/underway-venv";
pub const REGION: &str = "us-east-1";

/// A running LocalStack.
#[derive(Debug)]
pub struct LocalStack {
    pub endpoint: String,
    /// The process we started (None when the endpoint came from the environment).
    pub pid: Option<u32>,
}

/// The venv holding LocalStack.
pub fn venv() -> PathBuf {
    std::env::var_os(VENV_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_VENV))
}

/// Installs LocalStack into `venv` unless it is there already.
pub fn ensure_installed(venv: &Path) -> Result<PathBuf, HarnessError> {
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import localstack.runtime.main"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(python);
    }
    let fail = |reason: String| HarnessError::Install { venv: venv.display().to_string(), reason };
    let st = Command::new("python3").arg("-m").arg("venv").arg(venv).status()?;
    if !st.success() {
        return Err(fail(format!("python3 -m venv exited with {st}")));
    }
    let st = Command::new(venv.join("bin/pip")).args(["install", "-q"]).args(PIP_PACKAGES).status()?;
    if !st.success() {
        return Err(fail(format!("pip install exited with {st}")));
    }
    Ok(python)
}

fn free_port() -> Result<u16, HarnessError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One plain HTTP GET of the health page.
fn health(endpoint: &str) -> Result<String, String> {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect_timeout(&addr.parse().map_err(|e| format!("{addr}: {e}"))?, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET /_localstack/health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    let ec2_up = body.contains("\"ec2\": \"available\"") || body.contains("\"ec2\": \"running\"");
    if body.starts_with("HTTP/1.1 200") && ec2_up {
        Ok(body)
    } else {
        Err(body.lines().next().unwrap_or("no answer").to_string())
    }
}

/// Waits until the health page says EC2 is there.
pub fn wait_healthy(endpoint: &str, limit: Duration) -> Result<(), HarnessError> {
    let start = Instant::now();
    loop {
        match health(endpoint) {
            Ok(_) => return Ok(()),
            Err(reason) if start.elapsed() > limit => {
                return Err(HarnessError::Unhealthy {
                    endpoint: endpoint.to_string(),
                    waited_s: limit.as_secs(),
                    reason,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Starts LocalStack on a free loopback port, in its own process group, with a watchdog that
/// kills that group when `owner_pid` exits, however it exits.
pub fn start(owner_pid: u32, log: &Path) -> Result<(LocalStack, Child), HarnessError> {
    let python = ensure_installed(&venv())?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let logf = std::fs::File::create(log)?;
    let child = Command::new(python)
        .args(["-m", "localstack.runtime.main"])
        .env("GATEWAY_LISTEN", &listen)
        .env("GATEWAY_SERVER", "hypercorn")
        .env("LOCALSTACK_HOST", &listen)
        .env("DNS_ADDRESS", "0")
        .env("SERVICES", "ec2")
        .env("SKIP_SSL_CERT_DOWNLOAD", "1")
        .env("DISABLE_EVENTS", "1")
        .env("API_ENDPOINT", "http://127.0.0.1:9/v1")
        .env("ANALYTICS_API", "http://127.0.0.1:9/v1")
        .current_dir(std::env::temp_dir())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .map_err(|e| HarnessError::Start(e.to_string()))?;
    let pgid = child.id();
    spawn_watchdog(owner_pid, pgid)?;
    let endpoint = format!("http://{listen}");
    wait_healthy(&endpoint, Duration::from_secs(90)).inspect_err(|_| stop_group(pgid))?;
    Ok((LocalStack { endpoint, pid: Some(pgid) }, child))
}

/// Starts a shell, in its own process group, that waits for `owner_pid` to end (however it ends:
/// panic, Ctrl-C, SIGKILL) and then kills process group `pgid`: TERM, then KILL (LocalStack often
/// ignores TERM).
pub fn spawn_watchdog(owner_pid: u32, pgid: u32) -> Result<(), HarnessError> {
    // dash's kill takes `-PGID` after the signal, but not `--`.
    let script = format!(
        "while kill -0 {owner_pid} 2>/dev/null; do sleep 1; done; kill -TERM -{pgid} 2>/dev/null; sleep 3; kill -KILL -{pgid} 2>/dev/null"
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(())
}

/// Kills a LocalStack process group: TERM, then KILL (it often ignores TERM).
pub fn stop_group(pgid: u32) {
    let _ = Command::new("kill").args(["-TERM", "--", &format!("-{pgid}")]).status();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
}

impl LocalStack {
    /// The run's LocalStack: the one named by `UNDERWAY_LOCALSTACK_ENDPOINT`, else one started for
    /// this process on first use. Panics with the reason when neither works (a test cannot go on).
    pub fn shared() -> &'static LocalStack {
        static SHARED: OnceLock<LocalStack> = OnceLock::new();
        SHARED.get_or_init(|| {
            if let Ok(endpoint) = std::env::var(ENDPOINT_ENV) {
                wait_healthy(&endpoint, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{ENDPOINT_ENV}: {e}"));
                return LocalStack { endpoint, pid: None };
            }
            let log = std::env::temp_dir().join(format!("underway-localstack-{}.log", std::process::id()));
            let (ls, child) =
                start(std::process::id(), &log).unwrap_or_else(|e| panic!("{e} (log: {})", log.display()));
            std::mem::forget(child); // the watchdog reaps it with the process
            ls
        })
    }

    /// A fresh, empty account of this LocalStack, reached through its own strict EC2 front.
    pub fn account(&self) -> Account {
        let id = fresh_account_id();
        let direct = sdk_config(&id, &self.endpoint);
        let front = Front::start(&id, &self.endpoint, direct).unwrap_or_else(|e| panic!("starting the EC2 front: {e}"));
        let front = Arc::new(front);
        // A front serves its account until the process ends: SDK clients made from the account
        // (a fixture's, an Ec2Cloud's) often outlive the `Account` value itself.
        static LIVE: std::sync::Mutex<Vec<Arc<Front>>> = std::sync::Mutex::new(Vec::new());
        LIVE.lock().unwrap_or_else(|p| p.into_inner()).push(front.clone());
        Account { endpoint: front.endpoint().to_string(), id, upstream: self.endpoint.clone(), front }
    }
}

/// One LocalStack account: its own empty EC2 world, behind its own [`Front`] (AWS's rules, the
/// account's request buckets, faults on request).
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    /// The front's endpoint: what every SDK client of the tests uses.
    pub endpoint: String,
    /// LocalStack itself, for the test world's view of the cloud (not a client of EC2's API).
    pub upstream: String,
    pub front: Arc<Front>,
}

fn fresh_account_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let mixed = nanos
        .wrapping_mul(6364136223846793005)
        .wrapping_add(u64::from(std::process::id()) << 24)
        .wrapping_add(N.fetch_add(1, Ordering::Relaxed).wrapping_mul(1442695040888963407));
    format!("{:012}", 100_000_000_000 + mixed % 899_999_999_999)
}

/// An SDK config for account `id` at `endpoint`: static credentials whose key id is the account id.
fn sdk_config(id: &str, endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(Credentials::new(
            id,
            "test",
            None,
            None,
            "underway-tests",
        )))
        .build()
}

impl Account {
    /// An SDK config for this account through its front.
    pub fn sdk_config(&self) -> SdkConfig {
        sdk_config(&self.id, &self.endpoint)
    }

    /// An SDK config for this account straight to LocalStack: only for the test world, which plays
    /// the cloud itself (its reads are not an EC2 client's calls and must not spend the budget).
    pub fn direct_sdk_config(&self) -> SdkConfig {
        sdk_config(&self.id, &self.upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_kills_the_group_when_its_owner_ends() {
        // A process group that ignores TERM, like LocalStack often does, and a short-lived owner.
        let mut group = Command::new("sh").args(["-c", "trap '' TERM; sleep 60"]).process_group(0).spawn().unwrap();
        let mut owner = Command::new("sleep").arg("1").spawn().unwrap();
        spawn_watchdog(owner.id(), group.id()).unwrap();
        owner.wait().unwrap();
        let mut ended = None;
        for _ in 0..100 {
            ended = group.try_wait().unwrap();
            if ended.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = ended.expect("the group outlived its owner by 10 s");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed with KILL after TERM was ignored: {status:?}");
    }

    #[test]
    fn account_ids_are_twelve_digits_and_distinct() {
        let ids: std::collections::BTreeSet<_> = (0..1000).map(|_| fresh_account_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|i| i.len() == 12 && i.chars().all(|c| c.is_ascii_digit())));
    }
}
