//! The durable store: one snapshot file, replaced atomically (write a temporary file, fsync it,
//! rename it over the old one, fsync the directory). A reader sees the old snapshot or the new
//! one, never half of one.
//!
//! The file is a header line `underway-ipamd-state <format> <crc32 hex> <body length>` followed
//! by the JSON body. A torn, truncated or bit-flipped file fails the length or checksum test and
//! is reported as corrupt (and kept aside for a post-mortem); ipamd then rebuilds from the cloud
//! and the host instead of crashing.
//!
//! Formats: an older one is read and migrated (one `migrate_from_N` per change, each tested on a
//! file that format's ipamd wrote, `src/testdata/ipamd-state.vN`); a newer one stops start-up
//! (a downgrade must not drop what the newer ipamd recorded). Format history:
//! 1. the first; 2. each pod's network namespace path (for the orphan sweep, issue 14 item 5).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use underway_api::AttachmentKey;

use crate::error::{IpamdError, Result};
use crate::pool::Eni;

const MAGIC: &str = "underway-ipamd-state";
/// Bumped on any change of [`Snapshot`]'s shape; each bump gets a migration from the one before.
pub const FORMAT: u32 = 2;
const FILE: &str = "ipamd-state";

/// Who a pod is (recorded with its assignment when the runtime says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub key: AttachmentKey,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Unix milliseconds.
    pub assigned_at: u64,
    /// The pod's network namespace as the runtime gave it (CNI_NETNS); `None` for pods recorded
    /// before format 2. The orphan sweep reclaims an assignment only once this and the veth are gone.
    #[serde(default)]
    pub netns: Option<String>,
}

/// Everything ipamd must not forget.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The mode the addresses came from (absent in stores written before VPC-route mode: ENI).
    #[serde(default)]
    pub mode: Option<crate::config::Mode>,
    /// The pool's ENIs (in VPC-route mode, one pseudo-ENI named after the pod CIDR), their
    /// addresses and who holds each.
    pub enis: Vec<Eni>,
    pub pods: Vec<PodRecord>,
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No store yet (a fresh node).
    Fresh,
    Ok(Snapshot),
    /// The file was unreadable; it was moved to `kept` and `reason` says what was wrong.
    Corrupt {
        reason: String,
        kept: PathBuf,
    },
}

/// Why a file could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Damaged or not ours: rebuilt from the cloud and the host.
    Corrupt(String),
    /// Written by a newer ipamd: start-up stops (nothing is moved or rewritten).
    Newer(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Corrupt(r) => f.write_str(r),
            DecodeError::Newer(n) => write!(f, "format {n}, newer than this ipamd's {FORMAT}"),
        }
    }
}

impl From<String> for DecodeError {
    fn from(s: String) -> Self {
        DecodeError::Corrupt(s)
    }
}

impl From<&str> for DecodeError {
    fn from(s: &str) -> Self {
        DecodeError::Corrupt(s.to_string())
    }
}

/// Format 1's shapes, kept only to read such files.
mod v1 {
    use serde::Deserialize;
    use underway_api::AttachmentKey;

    #[derive(Deserialize)]
    pub struct PodRecord {
        pub key: AttachmentKey,
        pub namespace: Option<String>,
        pub name: Option<String>,
        pub assigned_at: u64,
    }

    #[derive(Deserialize)]
    pub struct Snapshot {
        #[serde(default)]
        pub mode: Option<crate::config::Mode>,
        pub enis: Vec<crate::pool::Eni>,
        pub pods: Vec<PodRecord>,
    }
}

/// Format 1 → 2: pods gain their netns, unknown for those already recorded.
fn migrate_from_1(body: &[u8]) -> std::result::Result<Snapshot, String> {
    let old: v1::Snapshot = serde_json::from_slice(body).map_err(|e| format!("format 1 body: {e}"))?;
    let pods = old
        .pods
        .into_iter()
        .map(|p| PodRecord {
            key: p.key,
            namespace: p.namespace,
            name: p.name,
            assigned_at: p.assigned_at,
            netns: None,
        })
        .collect();
    Ok(Snapshot { mode: old.mode, enis: old.enis, pods })
}

/// Makes `dir` a directory only its owner can use: created 0700, or tightened to 0700; refused
/// (with why) when group or others may write it, since anyone who can write there can replace the
/// socket or the state under ipamd.
pub fn private_dir(dir: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("cannot create: {e}"))?;
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    let own = std::fs::metadata("/proc/self").map_err(|e| e.to_string())?.uid();
    if md.uid() != own {
        return Err(format!("{} belongs to uid {}, not to ipamd's user ({own}): refusing", dir.display(), md.uid()));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {mode:04o}): refusing to keep the socket or state there; make it 0700",
            dir.display()
        ));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make it 0700: {e}"))?;
    }
    Ok(())
}

/// The lock file beside the state, held by the running ipamd.
pub const LOCK_FILE: &str = "ipamd.lock";

/// The state directory's lock; released when dropped (or when the process ends, however).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn store_err(path: &Path, reason: impl Into<String>) -> IpamdError {
    IpamdError::Store { path: path.display().to_string(), reason: reason.into() }
}

impl Store {
    /// A store in `dir`: created 0700 when missing, tightened to 0700 when it is not, refused
    /// when others may write it (a host path the DaemonSet mounts is created by the kubelet).
    pub fn open(dir: &Path) -> Result<Store> {
        private_dir(dir).map_err(|e| store_err(dir, e))?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Takes the state directory's exclusive lock (`ipamd.lock`, flock) for as long as the
    /// returned value lives, and writes this process's pid into it. A second ipamd on the node
    /// gets an error naming the holder's pid, before it touches the socket or the store
    /// (issue 14, item 2: it used to unlink the live socket and write the same temp file).
    pub fn lock(&self) -> Result<DirLock> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(LOCK_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| store_err(&path, e.to_string()))?;
        match f.try_lock() {
            Ok(()) => {
                f.set_len(0).map_err(|e| store_err(&path, e.to_string()))?;
                writeln!(f, "{}", std::process::id()).map_err(|e| store_err(&path, e.to_string()))?;
                Ok(DirLock { _file: f })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                Err(store_err(
                    &path,
                    format!(
                        "another ipamd (pid {}) holds this state directory; stop it first",
                        holder.trim().parse::<u32>().map_or("unknown".to_string(), |p| p.to_string())
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(store_err(&path, e.to_string())),
        }
    }

    pub fn load(&self) -> Result<Loaded> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Fresh),
            Err(e) => return Err(store_err(&path, e.to_string())),
        };
        match decode(&bytes) {
            Ok(s) => Ok(Loaded::Ok(s)),
            Err(DecodeError::Newer(n)) => Err(store_err(
                &path,
                format!(
                    "written by a newer ipamd (state format {n}; this one reads formats 1 to {FORMAT}): refusing to \
                     start rather than drop what it recorded; run the newer ipamd, or move the file aside to rebuild \
                     from EC2 and the host"
                ),
            )),
            Err(DecodeError::Corrupt(reason)) => {
                let kept = self.dir.join(format!("{FILE}.corrupt-{}", crate::clock::unix_ms()));
                std::fs::rename(&path, &kept)
                    .map_err(|e| store_err(&path, format!("{reason}; and cannot move it aside: {e}")))?;
                Ok(Loaded::Corrupt { reason, kept })
            }
        }
    }

    /// Replaces the snapshot durably; returns once the new one is on disk.
    pub fn save(&self, snap: &Snapshot) -> Result<()> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let bytes = encode(snap);
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            // 0600: the pods' names and addresses are root's business.
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            // A partial temporary file would only hold on to the space that ran out.
            let _ = std::fs::remove_file(&tmp);
            store_err(&path, format!("cannot save: {e}"))
        })
    }
}

/// The file's bytes for a snapshot.
pub fn encode(snap: &Snapshot) -> Vec<u8> {
    let body = serde_json::to_vec(snap).expect("the snapshot serialises");
    let mut out = format!("{MAGIC} {FORMAT} {:08x} {}\n", crc32fast::hash(&body), body.len()).into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A snapshot back from the file's bytes, or why not.
pub fn decode(bytes: &[u8]) -> std::result::Result<Snapshot, DecodeError> {
    let nl = bytes.iter().position(|b| *b == b'\n').ok_or("no header line (truncated?)")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
    let body = &bytes[nl + 1..];
    let f: Vec<&str> = header.split(' ').collect();
    if f.len() != 4 || f[0] != MAGIC {
        return Err(format!("not an underway state file (header {header:?})").into());
    }
    let format: u32 = f[1].parse().map_err(|_| format!("bad format field {:?}", f[1]))?;
    if format > FORMAT {
        return Err(DecodeError::Newer(format));
    }
    let len: usize = f[3].parse().map_err(|_| format!("bad length field {:?}", f[3]))?;
    if body.len() != len {
        return Err(format!("body is {} bytes, header says {len} (torn write?)", body.len()).into());
    }
    let crc = format!("{:08x}", crc32fast::hash(body));
    if crc != f[2] {
        return Err(format!("checksum {crc}, header says {}", f[2]).into());
    }
    match format {
        1 => Ok(migrate_from_1(body)?),
        FORMAT => Ok(serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?),
        n => Err(format!("format {n} is older than any this ipamd reads").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;

    #[test]
    fn directories_are_private_or_refused_and_the_state_file_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("underway-perm-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Store::open(&d).unwrap();
        assert_eq!(mode(&d), 0o700, "tightened");
        s.save(&Snapshot::default()).unwrap();
        assert_eq!(mode(&s.path()), 0o600);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Store::open(&d).unwrap_err().to_string();
        assert!(e.contains("writable by group or others (mode 0777)"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_holder_of_the_state_directory_at_a_time() {
        let d = std::env::temp_dir().join(format!("underway-lock-{}", std::process::id()));
        let s = Store::open(&d).unwrap();
        let held = s.lock().unwrap();
        let e = s.lock().unwrap_err().to_string();
        assert!(e.contains(&format!("another ipamd (pid {})", std::process::id())), "{e}");
        drop(held);
        let again = s.lock().expect("free once the holder is gone");
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn snapshot() -> Snapshot {
        let mut p = Pool::new(1000);
        p.add_eni("eni-0", 0, None);
        p.add_addresses("eni-0", &["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap()]).unwrap();
        let key = AttachmentKey { network: "n".into(), container_id: "c1".into(), ifname: "eth0".into() };
        p.assign(&key, 0).unwrap();
        let pods = vec![PodRecord {
            key,
            namespace: Some("default".into()),
            name: Some("web".into()),
            assigned_at: 7,
            netns: Some("/var/run/netns/cni-1".into()),
        }];
        Snapshot { mode: Some(crate::config::Mode::Eni), enis: p.enis().cloned().collect(), pods }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("underway-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_then_load() {
        let d = dir("ok");
        let s = Store::open(&d).unwrap();
        assert!(matches!(s.load().unwrap(), Loaded::Fresh));
        s.save(&snapshot()).unwrap();
        s.save(&snapshot()).unwrap();
        match s.load().unwrap() {
            Loaded::Ok(back) => assert_eq!(back, snapshot()),
            other => panic!("{other:?}"),
        }
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)], "no temporary file left");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_kind_of_damage_is_detected() {
        let good = encode(&snapshot());
        let nl = good.iter().position(|b| *b == b'\n').unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        let mut other_format = good.clone();
        other_format[MAGIC.len() + 1] = b'9';
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "no header"),
            ("torn in the header", good[..nl / 2].to_vec(), "no header"),
            ("torn in the body", good[..good.len() - 10].to_vec(), "torn"),
            ("bit flip", flipped, "checksum"),
            ("garbage", b"{\"enis\": []}\n".to_vec(), "not an underway state file"),
        ];
        for (name, bytes, want) in cases {
            match decode(&bytes).expect_err(name) {
                DecodeError::Corrupt(e) => assert!(e.contains(want), "{name}: {e}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(decode(&other_format).unwrap_err(), DecodeError::Newer(9));
        assert_eq!(decode(&good).unwrap(), snapshot());
    }

    /// A file format 1's ipamd wrote (kept in testdata, never regenerated) reads as the same pool
    /// and pods, with the netns that format did not record left unknown.
    #[test]
    fn a_format_1_store_is_migrated() {
        let bytes = include_bytes!("testdata/ipamd-state.v1");
        assert!(bytes.starts_with(b"underway-ipamd-state 1 "));
        let s = decode(bytes).expect("format 1 is read");
        assert_eq!(s.mode, Some(crate::config::Mode::Eni));
        let pool = Pool::from_enis(1000, s.enis.clone());
        let key = AttachmentKey { network: "underway".into(), container_id: "c1".into(), ifname: "eth0".into() };
        assert_eq!(pool.lease_of(&key).map(|l| l.address), Some("10.0.0.5".parse().unwrap()));
        assert!(pool.is_free("10.0.0.6".parse().unwrap()) && pool.is_free("10.0.1.7".parse().unwrap()));
        assert_eq!(pool.enis().find(|e| e.id == "eni-1").and_then(|e| e.route_table), Some(2));
        assert_eq!(
            s.pods,
            vec![PodRecord {
                key,
                namespace: Some("default".into()),
                name: Some("web".into()),
                assigned_at: 7,
                netns: None
            }]
        );
        // Saved again, it is the current format.
        assert!(encode(&s).starts_with(format!("underway-ipamd-state {FORMAT} ").as_bytes()));
    }

    #[test]
    fn a_newer_store_stops_start_up_and_is_left_in_place() {
        let d = dir("newer");
        let s = Store::open(&d).unwrap();
        let mut bytes = encode(&snapshot());
        bytes[MAGIC.len() + 1] = b'7';
        std::fs::write(s.path(), &bytes).unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("newer ipamd (state format 7; this one reads formats 1 to 2)"), "{e}");
        assert_eq!(std::fs::read(s.path()).unwrap(), bytes, "nothing moved or rewritten");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_reported() {
        let d = dir("corrupt");
        let s = Store::open(&d).unwrap();
        std::fs::write(s.path(), b"underway-ipamd-state 1 00000000 3\nabc").unwrap();
        match s.load().unwrap() {
            Loaded::Corrupt { reason, kept } => {
                assert!(reason.contains("checksum"), "{reason}");
                assert!(kept.exists());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.load().unwrap(), Loaded::Fresh), "the next load starts fresh");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
