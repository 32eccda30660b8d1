//! A test-only CNI plugin chained after underway (issue 15): it checks the prevResult a runtime
//! hands it the way a chained plugin (portmap, Cilium's generic-veth, Calico) relies on it, and
//! passes it on unchanged. What it checks:
//! - the prevResult is there (ADD, CHECK and DEL) and in the conf's `cniVersion`;
//! - exactly one interface has a `sandbox`, and it is `CNI_NETNS` / `CNI_IFNAME`;
//! - every other interface is a link in the plugin's (the node's) namespace (ADD and CHECK: on
//!   DEL the runtime may call after the pod is gone);
//! - every IP points (by `interface`) at the sandbox interface and, on ADD and CHECK, that
//!   interface holds it inside the pod's namespace.
//!
//! A failure is a CNI error (code 100 + the first check that failed). If the conf has `record`,
//! each prevResult seen is appended there as one JSON line `{"command", "prevResult"}`.

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::{Value, json};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let conf: Value = match std::io::stdin().read_to_end(&mut stdin).map(|_| serde_json::from_slice(&stdin)) {
        Ok(Ok(v)) => v,
        _ => return fail("0.4.0", 6, "cannot decode the network config"),
    };
    let version = conf["cniVersion"].as_str().unwrap_or("0.4.0").to_string();
    if command == "VERSION" {
        println!("{}", json!({"cniVersion": version, "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}));
        return ExitCode::SUCCESS;
    }
    let prev = conf.get("prevResult").cloned().unwrap_or(Value::Null);
    if let Some(path) = conf["record"].as_str() {
        let line = json!({"command": command, "prevResult": prev}).to_string() + "\n";
        let _ =
            std::fs::OpenOptions::new().create(true).append(true).open(path).map(|mut f| f.write_all(line.as_bytes()));
    }
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if let Err(why) = check(&command, &version, &prev, &env("CNI_NETNS"), &env("CNI_IFNAME")) {
        return fail(&version, 100, &why);
    }
    if command == "ADD" {
        println!("{prev}");
    }
    ExitCode::SUCCESS
}

fn check(command: &str, version: &str, prev: &Value, netns: &str, ifname: &str) -> Result<(), String> {
    if !prev.is_object() {
        return Err(format!("{command}: no prevResult"));
    }
    if prev["cniVersion"].as_str() != Some(version) {
        return Err(format!("prevResult is version {}, the conf {version}", prev["cniVersion"]));
    }
    let ifaces = prev["interfaces"].as_array().ok_or("prevResult has no interfaces")?;
    let sandboxed: Vec<usize> = (0..ifaces.len()).filter(|i| ifaces[*i].get("sandbox").is_some()).collect();
    let [pod] = sandboxed[..] else {
        return Err(format!("{} interfaces in a sandbox, want exactly 1", sandboxed.len()));
    };
    let (sb, name) = (ifaces[pod]["sandbox"].as_str(), ifaces[pod]["name"].as_str());
    if sb != Some(netns) || name != Some(ifname) {
        return Err(format!("the sandbox interface is {name:?} in {sb:?}, want {ifname} in {netns}"));
    }
    let live = command != "DEL";
    for (i, iface) in ifaces.iter().enumerate().filter(|(i, _)| *i != pod) {
        let host = iface["name"].as_str().ok_or(format!("interface {i} has no name"))?;
        if live && !std::path::Path::new("/sys/class/net").join(host).exists() {
            return Err(format!("host interface {host} is not a link on the node"));
        }
    }
    let ips = prev["ips"].as_array().filter(|a| !a.is_empty()).ok_or("prevResult has no ips")?;
    for ip in ips {
        if ip["interface"].as_u64() != Some(pod as u64) {
            return Err(format!(
                "ip {} points at interface {}, not the sandbox's ({pod})",
                ip["address"], ip["interface"]
            ));
        }
        let addr = ip["address"].as_str().ok_or("an ip without address")?;
        if live {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={netns}"))
                .args(["ip", "-4", "-o", "addr", "show", "dev", ifname])
                .output()
                .map_err(|e| format!("nsenter: {e}"))?;
            if !String::from_utf8_lossy(&out.stdout).contains(&format!("inet {addr} ")) {
                return Err(format!("{addr} is not on {ifname} in {netns}"));
            }
        }
    }
    Ok(())
}

fn fail(version: &str, code: u32, msg: &str) -> ExitCode {
    println!(
        "{}",
        json!({"cniVersion": version, "code": code, "msg": "probe: prevResult check failed", "details": msg})
    );
    ExitCode::FAILURE
}
