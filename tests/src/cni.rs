//! Runs the real `underway` CNI binary as a runtime does, inside a node's namespace.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::ipamd::{IpamdProcess, bin_path};

/// Runs the CNI plugin inside the node's namespace; returns (exit code, stdout JSON).
pub fn cni(node_ns: &str, command: &str, id: &str, netns: &str, conf: &str) -> (i32, Value) {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}");
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", args.as_str()),
    ];
    run(node_ns, &env, conf)
}

/// CNI GC as a runtime sends it: every attachment (container id, eth0) it still has.
pub fn gc(node_ns: &str, p: &IpamdProcess, valid: &[&str]) -> (i32, Value) {
    let attachments: Vec<Value> = valid.iter().map(|c| json!({"containerID": c, "ifname": "eth0"})).collect();
    let conf = json!({"cniVersion": "1.1.0", "name": "underway", "type": "underway", "ipamdSocket": p.socket,
                      "cni.dev/valid-attachments": attachments});
    run(node_ns, &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")], &conf.to_string())
}

fn run(node_ns: &str, env: &[(&str, &str)], stdin: &str) -> (i32, Value) {
    let bin = bin_path("underway").unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(&bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout);
    let v = if raw.trim().is_empty() { Value::Null } else { serde_json::from_str(&raw).unwrap() };
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
