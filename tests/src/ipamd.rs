//! A real `underway-ipamd` process inside a test-world node's namespace: its own config, state
//! directory and socket, IMDS and EC2 as the node sees them, and credentials of the world's
//! LocalStack account. Killed (SIGKILL) and its directory removed on drop.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use underway_api::{Request, Response};

use crate::HarnessError;
use crate::world::{Node, World};

/// Where cargo put the workspace's binaries (beside this executable, or beside its `deps/`).
pub fn bin_path(name: &str) -> Result<PathBuf, HarnessError> {
    // A test runs from target/<profile>/deps, a binary of this crate from target/<profile>.
    above_exe(1, name, "build the workspace first (tests/run does)")
}

/// `rel` in the first of the two directories that are `skip` levels above this executable's
/// own path; the error says `what_to_do`.
fn above_exe(skip: usize, rel: &str, what_to_do: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(skip)
        .take(2)
        .map(|d| d.join(rel))
        .find(|p| p.exists())
        .ok_or_else(|| HarnessError::Command(format!("{rel} is missing near {}: {what_to_do}", exe.display())))
}

/// The shipped CNI binary, `$CARGO_TARGET_DIR/cni/underway` (`cargo build-cni`: the `cni` profile,
/// linked static), found from this executable's target directory.
pub fn shipped_cni_path() -> Result<PathBuf, HarnessError> {
    // target/<profile>/deps/<test> or target/<profile>/<bin>: the target directory is above the profile's.
    above_exe(2, "cni/underway", "the shipped CNI binary: run `cargo build-cni` (tests/run does)")
}

/// EC2 operations that change something (the ones the EC2 mutating rate limit meters).
pub const MUTATING: &[&str] = &[
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "ModifyNetworkInterfaceAttribute",
    "DetachNetworkInterface",
    "DeleteNetworkInterface",
    "CreateRoute",
    "ReplaceRoute",
    "DeleteRoute",
];

/// Cloud calls by operation (any outcome) from ipamd's metrics text.
pub fn calls_by_operation(metrics: &str) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for l in metrics.lines().filter(|l| l.starts_with("underway_cloud_calls_total{")) {
        let op = l.split("operation=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        let n: f64 = l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        match out.iter_mut().find(|(o, _)| o == op) {
            Some((_, c)) => *c += n,
            None => out.push((op.to_string(), n)),
        }
    }
    out
}

/// False once the process has exited (a zombie counts as exited).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')).unwrap_or(false))
        .unwrap_or(false)
}

pub struct IpamdProcess {
    pub ns: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    bin: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// A cgroup's `cgroup.procs` the process is started in (the node bench measures ipamd's
    /// memory as its container's cgroup counts it).
    pub cgroup_procs: Option<PathBuf>,
}

impl IpamdProcess {
    /// Writes a config for `node` (the world's cluster, IMDS, EC2 endpoint; `extra` TOML is
    /// appended, for targets and timings) and starts ipamd.
    pub fn start(world: &World, node: &Node, bin: &Path, extra: &str) -> Result<IpamdProcess, HarnessError> {
        Self::start_with_env(world, node, bin, extra, &[])
    }

    /// [`IpamdProcess::start`] with more environment variables (e.g. `KUBECONFIG`).
    pub fn start_with_env(
        world: &World,
        node: &Node,
        bin: &Path,
        extra: &str,
        more_env: &[(&str, &str)],
    ) -> Result<IpamdProcess, HarnessError> {
        let mut p = Self::prepare(world, node, bin, extra, more_env)?;
        p.spawn()?;
        Ok(p)
    }

    /// [`IpamdProcess::start_with_env`]'s directory, config and environment, not started yet:
    /// [`IpamdProcess::spawn`] starts it.
    pub fn prepare(
        world: &World,
        node: &Node,
        bin: &Path,
        extra: &str,
        more_env: &[(&str, &str)],
    ) -> Result<IpamdProcess, HarnessError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "underway-ipamd-{}-{}-{}",
            std::process::id(),
            node.index,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("run/ipamd.sock");
        let config = dir.join("ipamd.toml");
        let text = format!(
            "cluster = \"{cluster}\"\nsocket = \"{sock}\"\nstate_dir = \"{state}\"\n{extra}\n",
            cluster = world.id(),
            sock = socket.display(),
            state = dir.join("state").display(),
        );
        std::fs::write(&config, text)?;
        let env = vec![
            ("AWS_ACCESS_KEY_ID".into(), world.account().id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), node.imds_endpoint_in_ns()),
            ("UNDERWAY_CLOUD__ENDPOINT".into(), node.ec2_endpoint_in_ns()),
            ("UNDERWAY_LOG".into(), "info,underway_ipamd=debug,aws=warn".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ];
        let env = env.into_iter().chain(more_env.iter().map(|(k, v)| (k.to_string(), v.to_string()))).collect();
        Ok(IpamdProcess {
            ns: node.ns.clone(),
            log: dir.join("ipamd.log"),
            dir,
            socket,
            config,
            bin: bin.to_path_buf(),
            env,
            child: None,
            cgroup_procs: None,
        })
    }

    /// Starts the process (again, after a kill or stop).
    pub fn spawn(&mut self) -> Result<(), HarnessError> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = match &self.cgroup_procs {
            // The shell joins the cgroup, then becomes `ip`, which becomes ipamd.
            Some(procs) => {
                let mut c = Command::new("sh");
                c.args(["-c", "echo $$ > \"$0\" && exec \"$@\"", &procs.display().to_string(), "ip"]);
                c
            }
            None => Command::new("ip"),
        };
        let child = cmd
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Runs another subcommand of the same binary with the same config and environment, inside
    /// the node's namespace, and waits for it.
    pub fn run_cmd(&self, args: &[&str]) -> Result<std::process::Output, HarnessError> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()?)
    }

    /// [`IpamdProcess::run_cmd`] killed after `limit` (`timeout`'s exit code 124 then): for a
    /// command that must end by itself, such as a second `run` on a held state directory.
    pub fn run_cmd_within(&self, limit: Duration, args: &[&str]) -> Result<std::process::Output, HarnessError> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", &limit.as_secs().max(1).to_string()])
            .arg(&self.bin)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()?)
    }

    /// Waits up to `limit` for the process to exit by itself; its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(Ok(Some(s))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// One RPC.
    pub fn call(&self, req: &Request) -> Result<Response, HarnessError> {
        underway_api::client::call(&self.socket, req, Duration::from_secs(60))
            .map_err(|e| HarnessError::Command(e.to_string()))
    }

    /// Waits until STATUS says ready and `free` addresses are free (and nothing waits).
    pub fn wait_ready(&self, free: u32, limit: Duration) -> Result<(), HarnessError> {
        let t = Instant::now();
        let mut last = String::from("no answer");
        while t.elapsed() < limit {
            if let Some(c) = &self.child
                && !alive(c.id())
            {
                return Err(HarnessError::Command(format!("ipamd exited; log:\n{}", self.log_text())));
            }
            match self.call(&Request::Status) {
                Ok(Response::Status(s)) if s.ready && s.free >= free && s.reason == "serving" => return Ok(()),
                Ok(r) => last = format!("{r:?}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(HarnessError::Command(format!(
            "ipamd not ready with {free} free after {limit:?}: {last}\nlog:\n{}",
            self.log_text()
        )))
    }

    /// `GET path` on a loopback port inside the node's namespace (metrics, introspection).
    pub fn http_get(&self, port: u16, path: &str) -> Result<String, HarnessError> {
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let body = crate::netns::in_ns(&self.ns, move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let (head, body) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(HarnessError::Command(format!("GET {path}: {head}")));
        }
        Ok(body.to_string())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no clean-up (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns its success.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for IpamdProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- ipamd log ({}) ---\n{}", self.ns, self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
