//! Node readiness through the CNI config directory: ipamd installs the conflist only once it
//! serves (a kubelet reports the node NotReady while the directory holds no network config), and
//! `underway-ipamd uninstall` removes it.

use std::path::{Path, PathBuf};

use crate::config::CniInstallConfig;
use crate::error::{IpamdError, Result};

fn target(cfg: &CniInstallConfig) -> Option<(PathBuf, &Path)> {
    let (dir, src) = (cfg.conf_dir.as_ref()?, cfg.conflist.as_ref()?);
    Some((dir.join(src.file_name()?), src))
}

/// Copies the conflist into the config directory atomically (temp file + rename): a runtime
/// never reads half a file. Nothing to do when not configured.
pub fn install(cfg: &CniInstallConfig) -> Result<Option<PathBuf>> {
    let Some((dest, src)) = target(cfg) else { return Ok(None) };
    let text = std::fs::read(src).map_err(IpamdError::io(format!("read {}", src.display())))?;
    serde_json::from_slice::<serde_json::Value>(&text)
        .map_err(|e| IpamdError::Config { field: "cni.conflist".into(), reason: format!("{}: {e}", src.display()) })?;
    let dir = dest.parent().expect("joined onto a directory");
    std::fs::create_dir_all(dir).map_err(IpamdError::io(format!("create {}", dir.display())))?;
    let tmp = dir.join(format!(".{}.tmp", dest.file_name().and_then(|n| n.to_str()).unwrap_or("underway")));
    std::fs::write(&tmp, &text).map_err(IpamdError::io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &dest).map_err(IpamdError::io(format!("rename to {}", dest.display())))?;
    Ok(Some(dest))
}

/// Removes the installed conflist (uninstall); absent is fine.
pub fn uninstall(cfg: &CniInstallConfig) -> Result<Option<PathBuf>> {
    let Some((dest, _)) = target(cfg) else { return Ok(None) };
    match std::fs::remove_file(&dest) {
        Ok(()) => Ok(Some(dest)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IpamdError::io(format!("remove {}", dest.display()))(e)),
    }
}
