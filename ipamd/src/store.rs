//! The durable store: one file in the state directory, written so that a crash at any moment
//! leaves either the old snapshot or the new one readable, never half of one.
//!
//! Layout (format 3): a header page `underway-ipamd-state 3 slots <slot bytes>`, then two slots
//! of that size, preallocated and written once in full when the file is made. Snapshot number
//! `seq` goes into slot `seq % 2` as `seq (u64 LE) | length (u32 LE) | crc32 (u32 LE) | JSON`,
//! the crc covering the sequence, the length and the JSON. A save overwrites the older slot in
//! place and returns after `fdatasync`: no new blocks, no size or name change, so no journal
//! commit for metadata (0.1–0.2 ms on the project's disk, against ~0.5–12 ms for a rewrite +
//! fsync + rename + directory fsync). A torn write damages only the slot being written, whose
//! crc then fails; the other slot still holds the previous snapshot, and nothing that snapshot
//! lacks was answered (an Add is answered only once its snapshot's save returned). Load takes
//! the valid slot with the higher sequence. When a snapshot outgrows its slot (or after an I/O
//! error) the whole file is rewritten at twice the size the old way (temporary file, fsync,
//! rename, directory fsync).
//!
//! Formats 1 and 2 were one snapshot per file: a header line `underway-ipamd-state <format>
//! <crc32 hex> <body length>` and the JSON body, replaced by rename on every save. They are
//! read and migrated (one `migrate_from_N` per change of the snapshot's shape, each tested on a
//! file that format's ipamd wrote, `src/testdata/ipamd-state.vN`); the first save writes format
//! 3 over them. A newer format stops start-up (a downgrade must not drop what the newer ipamd
//! recorded): format 3's first line has the four fields format 2's reader checks, so an ipamd of
//! format 2 refuses it as newer instead of calling it corrupt. Format history: 1. the first;
//! 2. each pod's network namespace path (for the orphan sweep, issue 14 item 5); 3. the two-slot
//! file (issue 17: the durable write was most of an Add's time), and each block's kind (VPC-route
//! mode's `pod-cidr-<cidr>` pseudo-ENI of formats 1 and 2 becomes a pod-CIDR block).
//!
//! A damaged file (neither slot whole, a bad header) is reported as corrupt and kept aside for a
//! post-mortem; ipamd then rebuilds from the cloud and the host instead of crashing.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use underway_api::AttachmentKey;

use crate::error::{IpamdError, Result};
use crate::pool::{Block, BlockKind};

const MAGIC: &str = "underway-ipamd-state";
/// Bumped on any change of the file's layout or of [`Snapshot`]'s shape; a shape change gets a
/// migration from the one before.
pub const FORMAT: u32 = 3;
const FILE: &str = "ipamd-state";
/// The header page; the slots start after it.
const PAGE: usize = 4096;
/// A slot's head: sequence, length, crc32.
const SLOT_HEAD: usize = 16;
/// The smallest slot (about 200 assignments with their pod records).
const MIN_SLOT: usize = 64 * 1024;
/// The largest slot a header may name (far above any pool: 1 GiB).
const MAX_SLOT: usize = 1 << 30;

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
    /// The pool's blocks (ENIs; in VPC-route mode the pod CIDR), their addresses and who holds
    /// each. Named `enis` in the file since format 1.
    pub enis: Vec<Block>,
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
        pub enis: Vec<crate::pool::Block>,
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

/// Formats 1 and 2 → 3: VPC-route mode's block was a pseudo-ENI named `pod-cidr-<cidr>`; it
/// becomes a pod-CIDR block named by its CIDR.
fn migrate_pod_cidr_blocks(snap: &mut Snapshot) {
    for b in &mut snap.enis {
        if let Some(cidr) = b.id.strip_prefix("pod-cidr-") {
            b.id = cidr.to_string();
            b.kind = BlockKind::PodCidr;
        }
    }
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

/// The open two-slot file: where the next save goes.
#[derive(Debug)]
struct Slots {
    file: File,
    /// Bytes per slot.
    slot: usize,
    /// The sequence of the newest whole snapshot in the file.
    seq: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// `None` until a load found a format-3 file or a save made one, and again after an I/O
    /// error: the next save then rewrites the whole file.
    slots: Arc<Mutex<Option<Slots>>>,
}

fn store_err(path: &Path, reason: impl Into<String>) -> IpamdError {
    IpamdError::Store { path: path.display().to_string(), reason: reason.into() }
}

impl Store {
    /// A store in `dir`: created 0700 when missing, tightened to 0700 when it is not, refused
    /// when others may write it (a host path the DaemonSet mounts is created by the kubelet).
    pub fn open(dir: &Path) -> Result<Store> {
        private_dir(dir).map_err(|e| store_err(dir, e))?;
        Ok(Store { dir: dir.to_path_buf(), slots: Arc::new(Mutex::new(None)) })
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
        let mut slots = self.slots.lock().expect("store lock");
        *slots = None;
        // A rewrite cut off by a crash leaves its temporary file: only space, never read.
        let _ = std::fs::remove_file(self.dir.join(format!("{FILE}.tmp")));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Fresh),
            Err(e) => return Err(store_err(&path, e.to_string())),
        };
        match decode(&bytes) {
            Ok((s, at)) => {
                if let Some((slot, seq)) = at {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| store_err(&path, e.to_string()))?;
                    // What was read may be a killed process's write that never reached the disk
                    // (its fdatasync cut short): made durable before the next save overwrites the
                    // other slot, or that save could leave no whole snapshot after a power loss.
                    // Failing that, the next save rewrites the whole file.
                    if file.sync_data().is_ok() {
                        *slots = Some(Slots { file, slot, seq });
                    }
                }
                Ok(Loaded::Ok(s))
            }
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

    /// Records the snapshot durably; returns once it is on disk. In place (one `pwrite` into
    /// the older slot and `fdatasync`) when it fits its slot; otherwise the file is rewritten
    /// with slots twice the snapshot's size.
    pub fn save(&self, snap: &Snapshot) -> Result<()> {
        let path = self.path();
        let body = serde_json::to_vec(snap).expect("the snapshot serialises");
        let mut slots = self.slots.lock().expect("store lock");
        if let Some(s) = slots.as_mut().filter(|s| SLOT_HEAD + body.len() <= s.slot) {
            let seq = s.seq + 1;
            let at = (PAGE + (seq % 2) as usize * s.slot) as u64;
            let written = s.file.write_all_at(&slot_head(seq, &body), at);
            match written
                .and_then(|()| s.file.write_all_at(&body, at + SLOT_HEAD as u64))
                .and_then(|()| s.file.sync_data())
            {
                Ok(()) => {
                    s.seq = seq;
                    return Ok(());
                }
                Err(e) => {
                    // After a failed fdatasync the kernel may have dropped the dirty pages: a
                    // retry in place could "succeed" over lost data. The next save rewrites.
                    *slots = None;
                    return Err(store_err(&path, format!("cannot save: {e}")));
                }
            }
        }
        let seq = slots.as_ref().map_or(0, |s| s.seq) + 1;
        let slot = (2 * (SLOT_HEAD + body.len())).next_multiple_of(PAGE).max(MIN_SLOT);
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let write = || -> std::io::Result<File> {
            use std::os::unix::fs::OpenOptionsExt;
            // 0600: the pods' names and addresses are root's business.
            let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // Every byte written once (not a sparse or fallocated file): later saves into the
            // slots then allocate nothing and change no metadata that fdatasync must commit.
            let mut all = vec![0u8; PAGE + 2 * slot];
            let head = format!("{MAGIC} {FORMAT} slots {slot}\n");
            all[..head.len()].copy_from_slice(head.as_bytes());
            let at = PAGE + (seq % 2) as usize * slot;
            all[at..at + SLOT_HEAD].copy_from_slice(&slot_head(seq, &body));
            all[at + SLOT_HEAD..at + SLOT_HEAD + body.len()].copy_from_slice(&body);
            f.write_all(&all)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()?;
            Ok(f)
        };
        match write() {
            Ok(file) => {
                *slots = Some(Slots { file, slot, seq });
                Ok(())
            }
            Err(e) => {
                *slots = None;
                // A partial temporary file would only hold on to the space that ran out.
                let _ = std::fs::remove_file(&tmp);
                Err(store_err(&path, format!("cannot save: {e}")))
            }
        }
    }
}

/// A slot's head for `body`: sequence, length, crc32 of both and the body. The body follows it.
fn slot_head(seq: u64, body: &[u8]) -> [u8; SLOT_HEAD] {
    let mut head = [0u8; SLOT_HEAD];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..12]);
    h.update(body);
    head[12..].copy_from_slice(&h.finalize().to_le_bytes());
    head
}

/// Slot `i`'s sequence and JSON if it holds a whole snapshot, else why not.
fn read_slot(bytes: &[u8], slot: usize, i: usize) -> std::result::Result<(u64, &[u8]), String> {
    let start = PAGE + i * slot;
    let region = bytes.get(start..(start + slot).min(bytes.len())).unwrap_or_default();
    if region.len() < SLOT_HEAD {
        return Err("missing (file cut short)".into());
    }
    let seq = u64::from_le_bytes(region[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(region[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(region[12..16].try_into().expect("4 bytes"));
    if seq == 0 && len == 0 && crc == 0 {
        return Err("never written".into());
    }
    let body = region
        .get(SLOT_HEAD..SLOT_HEAD + len)
        .ok_or_else(|| format!("length {len} runs past the slot (torn write?)"))?;
    let mut h = crc32fast::Hasher::new();
    h.update(&region[..12]);
    h.update(body);
    if h.finalize() != crc {
        return Err(format!("checksum mismatch for snapshot {seq} (torn write?)"));
    }
    if seq % 2 != i as u64 {
        return Err(format!("snapshot {seq} in the wrong slot"));
    }
    Ok((seq, body))
}

/// A format-2 file's bytes for a snapshot (one header line and the JSON): what ipamd wrote
/// before format 3, kept to test the migration from it.
#[cfg(test)]
pub fn encode_v2(snap: &Snapshot) -> Vec<u8> {
    let body = serde_json::to_vec(snap).expect("the snapshot serialises");
    let mut out = format!("{MAGIC} 2 {:08x} {}\n", crc32fast::hash(&body), body.len()).into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A snapshot back from the file's bytes, with the slot size and sequence it came from when the
/// file is format 3; or why not.
pub fn decode(bytes: &[u8]) -> std::result::Result<(Snapshot, Option<(usize, u64)>), DecodeError> {
    let nl = bytes.iter().take(PAGE).position(|b| *b == b'\n').ok_or("no header line (truncated?)")?;
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
    if format == FORMAT {
        let slot: usize = f[3]
            .parse::<usize>()
            .ok()
            .filter(|s| f[2] == "slots" && *s % PAGE == 0 && (MIN_SLOT..=MAX_SLOT).contains(s))
            .ok_or_else(|| format!("bad slot header {header:?}"))?;
        let read = [read_slot(bytes, slot, 0), read_slot(bytes, slot, 1)];
        let newest = read.iter().filter_map(|r| r.as_ref().ok()).max_by_key(|(seq, _)| *seq);
        let Some((seq, json)) = newest else {
            let why = |r: &std::result::Result<_, String>| r.as_ref().err().cloned().unwrap_or_default();
            return Err(format!(
                "neither slot holds a whole snapshot (slot 0: {}; slot 1: {})",
                why(&read[0]),
                why(&read[1])
            )
            .into());
        };
        let snap = serde_json::from_slice(json).map_err(|e| format!("snapshot {seq}: {e}"))?;
        return Ok((snap, Some((slot, *seq))));
    }
    let len: usize = f[3].parse().map_err(|_| format!("bad length field {:?}", f[3]))?;
    if body.len() != len {
        return Err(format!("body is {} bytes, header says {len} (torn write?)", body.len()).into());
    }
    let crc = format!("{:08x}", crc32fast::hash(body));
    if crc != f[2] {
        return Err(format!("checksum {crc}, header says {}", f[2]).into());
    }
    let mut snap = match format {
        1 => migrate_from_1(body)?,
        2 => serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?,
        n => return Err(format!("format {n} is older than any this ipamd reads").into()),
    };
    migrate_pod_cidr_blocks(&mut snap);
    Ok((snap, None))
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
        Snapshot { mode: Some(crate::config::Mode::Eni), enis: p.blocks().cloned().collect(), pods }
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
    fn every_kind_of_damage_to_a_format_2_file_is_detected() {
        let good = encode_v2(&snapshot());
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
        assert_eq!(decode(&good).unwrap(), (snapshot(), None));
    }

    fn inode(p: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.len())
    }

    fn with_pods(n: usize) -> Snapshot {
        let mut s = snapshot();
        let first = s.pods[0].clone();
        for i in 0..n {
            s.pods.push(PodRecord {
                key: AttachmentKey { container_id: format!("c{i:04}"), ..first.key.clone() },
                ..first.clone()
            });
        }
        s
    }

    /// After the first save, each save overwrites the older slot in place (same inode, same
    /// size); damage to the newest slot (a torn write) falls back to the one before; damage to
    /// both is reported as corrupt.
    #[test]
    fn saves_alternate_slots_in_place_and_a_torn_slot_falls_back_to_the_other() {
        let d = dir("slots");
        let s = Store::open(&d).unwrap();
        s.save(&with_pods(1)).unwrap();
        let made = inode(&s.path());
        for n in 2..=5 {
            s.save(&with_pods(n)).unwrap();
            assert_eq!(inode(&s.path()), made, "save {n} wrote in place");
        }
        let bytes = std::fs::read(s.path()).unwrap();
        let (back, at) = decode(&bytes).unwrap();
        let slot = at.unwrap().0;
        assert_eq!((back, at), (with_pods(5), Some((slot, 5))));
        // Snapshot 5 is in slot 1, snapshot 4 in slot 0. Tear the newest one's tail.
        let cases: Vec<(&str, usize, Result<Snapshot, &str>)> = vec![
            ("the newest slot's last byte", PAGE + slot + SLOT_HEAD + 100, Ok(with_pods(4))),
            ("the newest slot's length", PAGE + slot + 9, Ok(with_pods(4))),
            ("the older slot", PAGE + SLOT_HEAD + 5, Ok(with_pods(5))),
            ("the header", 3, Err("not an underway state file")),
        ];
        for (name, at, want) in cases {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            match (decode(&b), want) {
                (Ok((got, _)), Ok(w)) => assert_eq!(got, w, "{name}"),
                (Err(DecodeError::Corrupt(e)), Err(w)) => assert!(e.contains(w), "{name}: {e}"),
                (got, want) => panic!("{name}: {got:?}, wanted {want:?}"),
            }
        }
        let mut both = bytes.clone();
        both[PAGE + SLOT_HEAD + 5] ^= 1;
        both[PAGE + slot + SLOT_HEAD + 5] ^= 1;
        let e = format!("{:?}", decode(&both).unwrap_err());
        assert!(
            e.contains("neither slot holds a whole snapshot") && e.contains("checksum mismatch for snapshot 5"),
            "{e}"
        );
        // Cut short in the newest slot: the older one still reads.
        assert_eq!(decode(&bytes[..PAGE + slot + 20]).unwrap().0, with_pods(4));

        // A torn newest slot on disk: load falls back, and the next save goes on from there.
        let mut torn = bytes.clone();
        torn[PAGE + slot + SLOT_HEAD + 1] ^= 1;
        std::fs::write(s.path(), &torn).unwrap();
        let again = Store::open(&d).unwrap();
        assert!(matches!(again.load().unwrap(), Loaded::Ok(b) if b == with_pods(4)));
        again.save(&with_pods(6)).unwrap();
        assert!(matches!(again.load().unwrap(), Loaded::Ok(b) if b == with_pods(6)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Found by reading: a header naming a slot near usize::MAX overflowed the slot offsets
    /// (a panic in debug builds); a crash mid-rewrite left its temporary file for good.
    #[test]
    fn an_absurd_slot_size_is_corrupt_and_a_stale_temporary_file_is_removed() {
        for size in ["18446744073709551615", "2147483648", "4096", "65537"] {
            let mut b = format!("{MAGIC} {FORMAT} slots {size}\n").into_bytes();
            b.resize(PAGE + 2 * MIN_SLOT, 0);
            match decode(&b) {
                Err(DecodeError::Corrupt(e)) => assert!(e.contains("bad slot header"), "{size}: {e}"),
                other => panic!("{size}: {other:?}"),
            }
        }
        let d = dir("tmp");
        let s = Store::open(&d).unwrap();
        s.save(&snapshot()).unwrap();
        std::fs::write(d.join(format!("{FILE}.tmp")), b"half a rewrite").unwrap();
        assert!(matches!(s.load().unwrap(), Loaded::Ok(_)));
        assert!(!d.join(format!("{FILE}.tmp")).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A snapshot larger than its slot rewrites the file with bigger slots (a new inode), and
    /// the saves after it are in place again.
    #[test]
    fn a_snapshot_that_outgrows_its_slot_rewrites_the_file() {
        let d = dir("grow");
        let s = Store::open(&d).unwrap();
        s.save(&with_pods(1)).unwrap();
        let small = inode(&s.path());
        assert_eq!(small.1 as usize, PAGE + 2 * MIN_SLOT);
        let big = with_pods(1500);
        assert!(serde_json::to_vec(&big).unwrap().len() > MIN_SLOT);
        s.save(&big).unwrap();
        let grown = inode(&s.path());
        assert!(grown.0 != small.0 && grown.1 > small.1, "{small:?} → {grown:?}");
        s.save(&with_pods(1499)).unwrap();
        assert_eq!(inode(&s.path()), grown, "in place again");
        assert!(matches!(Store::open(&d).unwrap().load().unwrap(), Loaded::Ok(b) if b == with_pods(1499)));
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)], "no temporary file left");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// VPC-route mode's pseudo-ENI of formats 1 and 2 (`pod-cidr-<cidr>`) reads as a pod-CIDR
    /// block, its assignments kept.
    #[test]
    fn a_format_2_pod_cidr_pseudo_eni_becomes_a_pod_cidr_block() {
        let mut p = Pool::new(1000);
        p.add_eni("pod-cidr-100.64.3.0/24", 0, None);
        p.add_addresses("pod-cidr-100.64.3.0/24", &["100.64.3.1".parse().unwrap(), "100.64.3.2".parse().unwrap()])
            .unwrap();
        let key = AttachmentKey { network: "n".into(), container_id: "c1".into(), ifname: "eth0".into() };
        p.assign(&key, 0).unwrap();
        let old =
            Snapshot { mode: Some(crate::config::Mode::VpcRoute), enis: p.blocks().cloned().collect(), pods: vec![] };
        let (back, _) = decode(&encode_v2(&old)).unwrap();
        let pool = Pool::from_blocks(1000, back.enis);
        let lease = pool.lease_of(&key).unwrap();
        assert_eq!((lease.block.as_str(), lease.kind, lease.eni()), ("100.64.3.0/24", BlockKind::PodCidr, None));
        assert_eq!(pool.enis().count(), 0, "no ENI in the pool");
    }

    /// A format-2 store (one snapshot per file) is read, and the first save replaces it with
    /// format 3, whose first line format 2's reader takes for a newer format (it refuses to
    /// start) rather than for a damaged file (it would rebuild and drop the pods).
    #[test]
    fn a_format_2_store_is_read_then_replaced_and_format_2_would_refuse_the_new_one() {
        let d = dir("v2");
        let s = Store::open(&d).unwrap();
        std::fs::write(s.path(), encode_v2(&snapshot())).unwrap();
        assert!(matches!(s.load().unwrap(), Loaded::Ok(b) if b == snapshot()));
        s.save(&with_pods(2)).unwrap();
        let bytes = std::fs::read(s.path()).unwrap();
        assert_eq!(decode(&bytes).unwrap().1.map(|a| a.1), Some(1));
        // Format 2's header check, as that ipamd ran it.
        let line = std::str::from_utf8(&bytes[..bytes.iter().position(|b| *b == b'\n').unwrap()]).unwrap();
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!((f.len(), f[0]), (4, MAGIC), "{line}");
        assert!(f[1].parse::<u32>().unwrap() > 2, "{line}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A file format 1's ipamd wrote (kept in testdata, never regenerated) reads as the same pool
    /// and pods, with the netns that format did not record left unknown.
    #[test]
    fn a_format_1_store_is_migrated() {
        let bytes = include_bytes!("testdata/ipamd-state.v1");
        assert!(bytes.starts_with(b"underway-ipamd-state 1 "));
        let (s, _) = decode(bytes).expect("format 1 is read");
        assert_eq!(s.mode, Some(crate::config::Mode::Eni));
        let pool = Pool::from_blocks(1000, s.enis.clone());
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
        let d = dir("v1");
        let store = Store::open(&d).unwrap();
        store.save(&s).unwrap();
        assert!(
            std::fs::read(store.path())
                .unwrap()
                .starts_with(format!("underway-ipamd-state {FORMAT} slots ").as_bytes())
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_newer_store_stops_start_up_and_is_left_in_place() {
        let d = dir("newer");
        let s = Store::open(&d).unwrap();
        let mut bytes = encode_v2(&snapshot());
        bytes[MAGIC.len() + 1] = b'7';
        std::fs::write(s.path(), &bytes).unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("newer ipamd (state format 7; this one reads formats 1 to 3)"), "{e}");
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
