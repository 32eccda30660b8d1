//! The network configuration on stdin, checked field by field so every error names its field.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::env::Command;
use crate::error::{CniError, code};

/// CNI spec versions this plugin speaks, oldest first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const PLUGIN_TYPE: &str = "underway";

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub ipamd_socket: PathBuf,
    pub mtu: Option<u32>,
    pub veth_prefix: String,
    pub log_file: Option<PathBuf>,
    pub debug: bool,
    pub ipamd_timeout: Duration,
    /// GC: the attachments the runtime still has, as (container id, ifname).
    pub valid_attachments: Vec<(String, String)>,
    pub prev_result: Option<Value>,
}

/// Position of a version in [`SUPPORTED`], for "at least" checks.
pub fn version_rank(v: &str) -> Option<usize> {
    SUPPORTED.iter().position(|s| *s == v)
}

fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, CniError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CniError::config(field, format!("must be a string, not {other}"))),
    }
}

fn req_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<&'a str, CniError> {
    opt_str(m, field)?.ok_or_else(|| CniError::config(field, "is missing"))
}

fn opt_u64(m: &Map<String, Value>, field: &str, min: u64, max: u64) -> Result<Option<u64>, CniError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(CniError::config(field, format!("must be a whole number from {min} to {max}, not {n}"))),
        },
        Some(other) => Err(CniError::config(field, format!("must be a number, not {other}"))),
    }
}

fn simple_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

/// Parses stdin for `command`.
pub fn parse(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE, "cannot decode the network config on stdin", e.to_string()))?;
    let Value::Object(m) = v else {
        return Err(CniError::new(
            code::DECODE,
            "cannot decode the network config on stdin",
            "it is not a JSON object",
        ));
    };
    let cni_version = req_str(&m, "cniVersion")?.to_string();
    let rank = version_rank(&cni_version).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version in field cniVersion",
            format!("{cni_version:?} is not one of {}", SUPPORTED.join(", ")),
        )
    })?;
    let needs = match command {
        Command::Check => Some("0.4.0"),
        Command::Status | Command::Gc => Some("1.1.0"),
        _ => None,
    };
    if let Some(min) = needs
        && rank < version_rank(min).expect("listed")
    {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version in field cniVersion",
            format!("{command:?} needs cniVersion {min} or later, got {cni_version}"),
        ));
    }
    let name = req_str(&m, "name")?;
    if !simple_name(name) {
        return Err(CniError::config("name", format!("{name:?} must be non-empty, of A-Z a-z 0-9 _ . -")));
    }
    let ty = req_str(&m, "type")?;
    if ty != PLUGIN_TYPE {
        return Err(CniError::config("type", format!("is {ty:?}, this plugin is {PLUGIN_TYPE:?}")));
    }
    let ipamd_socket = PathBuf::from(opt_str(&m, "ipamdSocket")?.unwrap_or(underway_api::DEFAULT_SOCKET));
    if !ipamd_socket.is_absolute() {
        return Err(CniError::config("ipamdSocket", format!("{} must be an absolute path", ipamd_socket.display())));
    }
    let mtu = opt_u64(&m, "mtu", 576, 65535)?.map(|v| v as u32);
    let veth_prefix = opt_str(&m, "vethPrefix")?.unwrap_or("uw").to_string();
    if veth_prefix.is_empty() || veth_prefix.len() > 4 || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(CniError::config("vethPrefix", format!("{veth_prefix:?} must be 1 to 4 letters or digits")));
    }
    let log_file = opt_str(&m, "logFile")?.map(PathBuf::from);
    if let Some(p) = &log_file
        && !p.is_absolute()
    {
        return Err(CniError::config("logFile", format!("{} must be an absolute path", p.display())));
    }
    let debug = match opt_str(&m, "logLevel")? {
        None | Some("info") | Some("warn") | Some("error") => false,
        Some("debug") => true,
        Some(other) => {
            return Err(CniError::config("logLevel", format!("{other:?} is not one of debug, info, warn, error")));
        }
    };
    let ipamd_timeout = Duration::from_secs(opt_u64(&m, "ipamdTimeoutSeconds", 1, 600)?.unwrap_or(60));
    for field in ["runtimeConfig", "prevResult"] {
        if let Some(v) = m.get(field)
            && !v.is_object()
            && !v.is_null()
        {
            return Err(CniError::config(field, format!("must be an object, not {v}")));
        }
    }
    let mut valid_attachments = Vec::new();
    if let Some(v) = m.get("cni.dev/valid-attachments") {
        let field = "cni.dev/valid-attachments";
        let Value::Array(items) = v else { return Err(CniError::config(field, "must be a list")) };
        for (i, item) in items.iter().enumerate() {
            let Value::Object(o) = item else {
                return Err(CniError::config(field, format!("item {i} must be an object")));
            };
            let inner = |name: &'static str| {
                move |e: CniError| CniError::config(field, format!("item {i}: {name} {}", e.details))
            };
            let c = req_str(o, "containerID").map_err(inner("containerID"))?;
            let f = req_str(o, "ifname").map_err(inner("ifname"))?;
            valid_attachments.push((c.to_string(), f.to_string()));
        }
    }
    Ok(NetConf {
        cni_version,
        name: name.to_string(),
        ipamd_socket,
        mtu,
        veth_prefix,
        log_file,
        debug,
        ipamd_timeout,
        valid_attachments,
        prev_result: m.get("prevResult").filter(|v| v.is_object()).cloned(),
    })
}
