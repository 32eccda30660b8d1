//! Netlink handles bound to a network namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use rtnetlink::Handle;

use crate::{Result, RoutesError};

/// A namespace: its file (kept open, for moving links into it) and a netlink handle inside it.
pub struct Ns {
    pub file: File,
    pub handle: Handle,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RoutesError + '_ {
    move |source| RoutesError::Netns { path: path.display().to_string(), source }
}

/// Opens a netlink socket inside the namespace at `path` (a short-lived thread enters the
/// namespace, creates the socket and leaves; the socket stays bound to the namespace) and drives
/// its connection on the current tokio runtime. `None` is the caller's own namespace.
pub fn handle_in(path: Option<&Path>) -> Result<Ns> {
    let own = Path::new("/proc/self/ns/net");
    let target = path.unwrap_or(own);
    let file = File::open(target).map_err(io_err(target))?;
    let (conn, handle, _) = match path {
        None => rtnetlink::new_connection().map_err(io_err(target))?,
        Some(_) => {
            let fd = file.try_clone().map_err(io_err(target))?;
            let rt = tokio::runtime::Handle::current();
            std::thread::spawn(move || -> std::io::Result<_> {
                let _in_runtime = rt.enter(); // the socket registers with this runtime's reactor
                nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                rtnetlink::new_connection()
            })
            .join()
            .map_err(|_| RoutesError::Netns {
                path: target.display().to_string(),
                source: std::io::Error::other("thread panicked"),
            })?
            .map_err(io_err(target))?
        }
    };
    tokio::spawn(conn);
    Ok(Ns { file, handle })
}

/// Runs `f` on a short-lived thread inside the namespace at `path` (`None`: right here).
pub(crate) fn on_thread_in<T: Send + 'static>(
    path: Option<&Path>,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<std::io::Result<T>> {
    let Some(p) = path else { return Ok(f()) };
    let ns = File::open(p).map_err(io_err(p))?;
    std::thread::spawn(move || -> std::io::Result<T> {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| RoutesError::Netns { path: p.display().to_string(), source: std::io::Error::other("thread panicked") })
}

static PROC_SYS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Where the node's sysctls are written and read (default `/proc/sys`), set once at start-up. A
/// container that is not privileged has `/proc/sys` read-only; the DaemonSet mounts the node's
/// `/proc/sys/net` writable at `/host/proc/sys/net` (as Cilium does) and sets this to
/// `/host/proc/sys`. Entries under `net/` are those of the opener's network namespace.
pub fn set_proc_sys(root: std::path::PathBuf) {
    let _ = PROC_SYS.set(root);
}

fn proc_sys(key: &str) -> String {
    let root = PROC_SYS.get().map(|p| p.display().to_string()).unwrap_or_else(|| "/proc/sys".into());
    format!("{root}/{key}")
}

/// Writes `<proc sys>/<key>` as seen from the namespace at `path` (`None`: this one).
pub fn sysctl_in(path: Option<&Path>, key: &str, value: &str) -> Result<()> {
    let file = proc_sys(key);
    let (f, v) = (file.clone(), value.to_string());
    on_thread_in(path, move || std::fs::write(&f, v))?.map_err(|source| RoutesError::Netns { path: file, source })
}

/// Reads `/proc/sys/<key>` as seen from the namespace at `path` (`None`: this one).
pub fn sysctl_read(path: Option<&Path>, key: &str) -> Result<String> {
    let file = proc_sys(key);
    let f = file.clone();
    on_thread_in(path, move || std::fs::read_to_string(&f))?.map_err(|source| RoutesError::Netns { path: file, source })
}
