//! Runs the real `underway` CNI binary as a runtime does, inside a node's namespace.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::ipamd::{IpamdProcess, bin_path};

/// Runs the CNI plugin inside the node's namespace; returns (exit code, stdout JSON).
pub fn cni(node_ns: &str, command: &str, id: &str, netns: &str, conf: &str) -> (i32, Value) {
    run_bin(&bin_path("underway").unwrap(), node_ns, &pod_env(command, id, netns), conf)
}

/// CNI GC as a runtime sends it: every attachment (container id, eth0) it still has.
pub fn gc(node_ns: &str, p: &IpamdProcess, valid: &[&str]) -> (i32, Value) {
    let attachments: Vec<Value> = valid.iter().map(|c| json!({"containerID": c, "ifname": "eth0"})).collect();
    let conf = json!({"cniVersion": "1.1.0", "name": "underway", "type": "underway", "ipamdSocket": p.socket,
                      "cni.dev/valid-attachments": attachments});
    run(node_ns, &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")], &conf.to_string())
}

/// Runs a conflist the way libcni does: ADD through the plugins in order, each given the
/// previous one's result as `prevResult`; CHECK in order and DEL in reverse, each given the cached
/// final result (`cached`). A plugin with `capabilities` gets the matching `runtime` entries as
/// `runtimeConfig`. `underway` and `underway-probe` are this workspace's builds, other types
/// Debian's in /usr/lib/cni. Returns the final result (ADD) or the failing plugin, code and output.
/// Plugins are looked for in `bin_dir` first when given (a node's CNI bin directory, where an
/// image's init container installed them).
#[allow(clippy::too_many_arguments)]
pub fn chain(
    bin_dir: Option<&std::path::Path>,
    node_ns: &str,
    command: &str,
    id: &str,
    netns: &str,
    conflist: &Value,
    runtime: &Value,
    cached: Option<&Value>,
) -> Result<Value, (String, i32, Value)> {
    let mut plugins: Vec<&Value> = conflist["plugins"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    if command == "DEL" {
        plugins.reverse();
    }
    let mut prev = cached.cloned();
    for p in plugins {
        let mut conf = p.clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        if let Some(prev) = &prev {
            conf["prevResult"] = prev.clone();
        }
        if let Some(caps) = p["capabilities"].as_object() {
            let rc: serde_json::Map<String, Value> = caps
                .iter()
                .filter(|(k, on)| on.as_bool() == Some(true) && runtime.get(k.as_str()).is_some())
                .map(|(k, _)| (k.clone(), runtime[k.as_str()].clone()))
                .collect();
            if !rc.is_empty() {
                conf["runtimeConfig"] = Value::Object(rc);
            }
        }
        let ty = p["type"].as_str().unwrap_or_default().to_string();
        let bin = match (bin_dir.map(|d| d.join(&ty)), ty.as_str()) {
            (Some(p), _) if p.exists() => p,
            (_, "underway" | "underway-probe") => bin_path(&ty).unwrap(),
            (_, other) => std::path::Path::new("/usr/lib/cni").join(other),
        };
        let (code, out) = run_bin(&bin, node_ns, &pod_env(command, id, netns), &conf.to_string());
        if code != 0 {
            return Err((ty, code, out));
        }
        if command == "ADD" {
            prev = Some(out);
        }
    }
    Ok(prev.unwrap_or(Value::Null))
}

fn pod_env(command: &str, id: &str, netns: &str) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", id.to_string()),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/usr/lib/cni".to_string()),
        ("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn run(node_ns: &str, env: &[(&str, &str)], stdin: &str) -> (i32, Value) {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    run_bin(&bin_path("underway").unwrap(), node_ns, &env, stdin)
}

fn run_bin(bin: &std::path::Path, node_ns: &str, env: &[(String, String)], stdin: &str) -> (i32, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout);
    let v = if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}): {raw}", bin.display()))
    };
    (out.status.code().unwrap_or(-1), v)
}

/// A 1.0.0 network config pointing at `p`'s socket.
pub fn conf(p: &IpamdProcess) -> String {
    json!({"cniVersion": "1.0.0", "name": "underway", "type": "underway", "ipamdSocket": p.socket}).to_string()
}

/// The first address of a CNI result.
pub fn address(result: &Value) -> Ipv4Addr {
    let a = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
    a.split('/').next().unwrap().parse().unwrap()
}

/// Runs `cmd` inside the namespace `node` (an open `/run/netns/<name>` file) as a container
/// runtime starts a plugin: `setns` between fork and exec, no `ip netns exec` (whose mount
/// namespace and /sys remount cost milliseconds a runtime does not pay). Feeds `stdin`; returns
/// the time from spawn to exit. Panics with the output when the command fails. For benchmarks.
pub fn timed_in(node: &std::fs::File, mut cmd: Command, stdin: &str) -> std::time::Duration {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = node.as_raw_fd();
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setns is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let what = format!("{cmd:?}");
    let t0 = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// A CNI plugin's command line for [`timed_in`]: only the CNI variables and PATH in its
/// environment.
pub fn plugin_command(bin: &str, command: &str, id: &str, netns: &str) -> Command {
    let mut c = Command::new(bin);
    c.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    c
}

/// The `p` quantile (0–1, nearest rank) of `v`, sorting it.
pub fn quantile(v: &mut [std::time::Duration], p: f64) -> std::time::Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}
