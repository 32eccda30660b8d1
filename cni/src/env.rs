//! The CNI_* environment variables, checked.

use std::collections::BTreeMap;

use crate::error::CniError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn pod_namespace(&self) -> Option<String> {
        self.args.get("K8S_POD_NAMESPACE").cloned()
    }
    pub fn pod_name(&self) -> Option<String> {
        self.args.get("K8S_POD_NAME").cloned()
    }
}

pub const MAX_CONTAINER_ID: usize = 256;

fn container_id(v: &str) -> Result<String, CniError> {
    if v.is_empty() {
        return Err(CniError::env("CNI_CONTAINERID", "is empty"));
    }
    if v.len() > MAX_CONTAINER_ID {
        return Err(CniError::env("CNI_CONTAINERID", format!("is {} bytes, more than {MAX_CONTAINER_ID}", v.len())));
    }
    if !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
        || !v.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(CniError::env("CNI_CONTAINERID", format!("{v:?} has characters other than A-Z a-z 0-9 _ . -")));
    }
    Ok(v.to_string())
}

fn cni_args(v: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in v.split(';').filter(|p| !p.is_empty()) {
        let Some((k, val)) = pair.split_once('=') else {
            return Err(CniError::env("CNI_ARGS", format!("{pair:?} is not KEY=VALUE")));
        };
        if k.is_empty() {
            return Err(CniError::env("CNI_ARGS", format!("{pair:?} has an empty key")));
        }
        out.insert(k.to_string(), val.to_string());
    }
    Ok(out)
}

/// Reads and checks the variables the command needs. `get` is the environment.
pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some(other) => return Err(CniError::env("CNI_COMMAND", format!("unknown command {other:?}"))),
        None => return Err(CniError::env("CNI_COMMAND", "is not set")),
    };
    let mut env = Env {
        command,
        container_id: String::new(),
        netns: String::new(),
        ifname: String::new(),
        args: BTreeMap::new(),
    };
    if !matches!(command, Command::Add | Command::Del | Command::Check) {
        return Ok(env);
    }
    env.container_id = container_id(&get("CNI_CONTAINERID").unwrap_or_default())?;
    env.ifname = get("CNI_IFNAME").unwrap_or_default();
    underway_routes::pod::check_ifname("CNI_IFNAME", &env.ifname)
        .map_err(|e| CniError::env("CNI_IFNAME", e.to_string()))?;
    if get("CNI_PATH").is_none() {
        return Err(CniError::env("CNI_PATH", "is not set"));
    }
    env.args = cni_args(&get("CNI_ARGS").unwrap_or_default())?;
    env.netns = get("CNI_NETNS").unwrap_or_default();
    if command != Command::Del && env.netns.is_empty() {
        // DEL must succeed with an empty or vanished netns (containerd's second DEL).
        return Err(CniError::env("CNI_NETNS", "is empty"));
    }
    Ok(env)
}

/// Linux's magic number of the nsfs filesystem (`NSFS_MAGIC`, linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// A network namespace's type as NS_GET_NSTYPE answers it (`CLONE_NEWNET`, linux/sched.h).
const CLONE_NEWNET: i32 = 0x4000_0000;
// NS_GET_NSTYPE: _IO(0xb7, 0x3), linux/nsfs.h.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

/// Checks CNI_NETNS for ADD and CHECK, after the config (the reference plugins' order: version,
/// decoding, config, then the environment's namespace). It must be a network namespace file
/// (nsfs, type net) other than the one the plugin runs in: a FIFO would hang the plugin on open,
/// and the host's own namespace would get a pod's interface and default route.
pub fn check_netns(env: &Env) -> Result<(), CniError> {
    if !matches!(env.command, Command::Add | Command::Check) {
        return Ok(());
    }
    let path = std::path::Path::new(&env.netns);
    let bad = |why: String| CniError::env("CNI_NETNS", format!("{}: {why}", env.netns));
    // statfs never opens the file, so a FIFO cannot block here.
    let fs = nix::sys::statfs::statfs(path).map_err(|e| bad(e.desc().to_string()))?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(bad("is not a namespace file (nsfs)".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open nsfs file descriptor.
    let kind =
        unsafe { ns_get_nstype(std::os::fd::AsRawFd::as_raw_fd(&file)) }.map_err(|e| bad(e.desc().to_string()))?;
    if kind != CLONE_NEWNET {
        return Err(bad(format!("is a namespace of another type ({kind:#x}), not a network namespace")));
    }
    // A namespace is one nsfs inode: the same (device, inode) as our own is our own.
    use std::os::unix::fs::MetadataExt;
    let (theirs, own) = (
        file.metadata().map_err(|e| bad(e.to_string()))?,
        std::fs::metadata("/proc/self/ns/net").map_err(|e| bad(e.to_string()))?,
    );
    if (theirs.dev(), theirs.ino()) == (own.dev(), own.ino()) {
        return Err(bad("is the network namespace the plugin runs in (the host's), not a pod's".into()));
    }
    Ok(())
}
