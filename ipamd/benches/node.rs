//! ipamd on the test world: EC2 calls per 100 pods, RSS with 250 assignments, restart → serving,
//! CNI ADD/DEL through this ipamd against ptp + host-local, and a burst of 110 concurrent ADDs
//! from a cold pool.
//!
//! `cargo build-cni && cargo bench -p underway-ipamd --bench node [-- SECTION…]`
//! (root; LocalStack is started by the harness when `UNDERWAY_LOCALSTACK_ENDPOINT` is unset).
//! Sections: `store`, `calls`, `rss`, `kubernetes`, `add_del`, `burst`; all when none is named.
//! `UNDERWAY_IPAMD_BIN=<path>` runs another build of ipamd (e.g. `--profile ipamd`'s). Each
//! figure is printed beside its target as a ratio. A measurement, not a test: `cargo test` does
//! not run it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use underway_api::{Request, Response};
use underway_tests::cni::{plugin_command, quantile, timed_in};
use underway_tests::ipamd::{MUTATING, calls_by_operation as calls};
use underway_tests::netns::TempNs;

/// A `/proc/<pid>/status` figure in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// "anonymous X MiB + file-backed Y MiB": what the process allocated, and the binary's and
/// libraries' pages it has mapped (clean, shared with the page cache).
fn split(pid: u32) -> String {
    let mib = |f| status_kib(pid, f) as f64 / 1024.0;
    format!("anonymous {:.1} MiB + file-backed {:.1} MiB", mib("RssAnon"), mib("RssFile"))
}

/// Proportional set size in KiB (`/proc/<pid>/smaps_rollup`): RSS with each shared page divided
/// among the processes mapping it.
fn pss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let line = s.lines().find(|l| l.starts_with("Pss:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A memory cgroup of ipamd's own, as its container gets one, under the bench's own memory cgroup
/// (cgroup v1's `memory.usage_in_bytes` or v2's `memory.current`: the same counter), with a
/// fresh copy of the binary whose pages are not in the page cache, so that ipamd's first touch
/// charges them to its cgroup as a container's first run does.
struct MemCgroup {
    dir: std::path::PathBuf,
    v2: bool,
    bin_dir: std::path::PathBuf,
}

impl MemCgroup {
    fn new() -> Result<MemCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name =
            format!("underway-bench-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let parent = if v2 {
            let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 line")?;
            let parent = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            let ctl = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
            if !ctl.split_whitespace().any(|c| c == "memory") {
                return Err(format!("{}: memory is not delegated to children", parent.display()));
            }
            parent
        } else {
            let path = own
                .lines()
                .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
                .ok_or("no memory cgroup")?;
            std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'))
        };
        let dir = parent.join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let bin_dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&bin_dir).map_err(|e| e.to_string())?;
        Ok(MemCgroup { dir, v2, bin_dir })
    }

    /// A copy of `bin` that is not in the page cache.
    fn fresh_copy(&self, bin: &std::path::Path) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        let to = self.bin_dir.join(bin.file_name().unwrap());
        std::fs::copy(bin, &to).unwrap();
        let f = std::fs::File::open(&to).unwrap();
        f.sync_all().unwrap();
        // SAFETY: an advisory call on an open descriptor; it only drops clean cached pages.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise");
        to
    }

    fn procs(&self) -> std::path::PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap()
    }

    /// (usage, working set) in KiB: the cgroup's whole charge, and that less its inactive file
    /// pages (what the kubelet evicts by and `container_memory_working_set_bytes` shows).
    fn usage_kib(&self) -> (u64, u64) {
        let usage: u64 =
            self.read(if self.v2 { "memory.current" } else { "memory.usage_in_bytes" }).trim().parse().unwrap();
        let stat = self.read("memory.stat");
        let key = if self.v2 { "inactive_file " } else { "total_inactive_file " };
        let inactive: u64 =
            stat.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        (usage / 1024, usage.saturating_sub(inactive) / 1024)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bin_dir);
        // Its process is gone by now (dropped first); what it charged moves to the parent.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("left {} behind", self.dir.display());
    }
}

/// ipamd in a memory cgroup of its own when this machine gives one, started from a fresh copy of
/// the binary. Its fields drop in order: the process, then its cgroup.
struct Measured {
    p: underway_tests::ipamd::IpamdProcess,
    cg: Option<MemCgroup>,
}

fn start_measured(
    w: &underway_tests::world::World,
    n: &underway_tests::world::Node,
    extra: &str,
    env: &[(&str, &str)],
) -> Measured {
    let cg = MemCgroup::new().map_err(|e| println!("(no cgroup of its own: {e})")).ok();
    let bin = cg.as_ref().map_or_else(ipamd_bin, |c| c.fresh_copy(&ipamd_bin()));
    let mut p = underway_tests::ipamd::IpamdProcess::prepare(w, n, &bin, extra, env).unwrap();
    p.cgroup_procs = cg.as_ref().map(MemCgroup::procs);
    p.spawn().unwrap();
    Measured { p, cg }
}

/// "RSS a MiB, PSS b MiB, its cgroup c MiB (working set d MiB)".
fn memory(m: &Measured) -> String {
    let pid = m.p.pid().unwrap();
    let mib = |k: u64| k as f64 / 1024.0;
    let mut s = format!("RSS {:.1} MiB, PSS {:.1} MiB", mib(rss_kib(pid)), mib(pss_kib(pid)));
    if let Some(cg) = &m.cg {
        let (usage, ws) = cg.usage_kib();
        s += &format!(", its cgroup {:.1} MiB (working set {:.1} MiB)", mib(usage), mib(ws));
    }
    s
}

/// `n` pods, 25 at a time in parallel.
fn pods(p: &underway_tests::ipamd::IpamdProcess, prefix: &str, n: usize) {
    for chunk in 0..n.div_ceil(25) {
        let k = (n - chunk * 25).min(25);
        for (c, r) in add_parallel(p, &format!("{prefix}{chunk:02}"), k) {
            assert!(matches!(r, Response::Added(_)), "{c}: {r:?}");
        }
    }
}

async fn ec2_calls_for_100_pods(instance_type: &str, extra: &str) -> (f64, f64, String) {
    let (w, n) = world(instance_type).await;
    let p = start(&w, &n, &format!("{FAST}{extra}"));
    p.wait_ready(0, Duration::from_secs(60)).unwrap();
    pods(&p, "p", 100);
    eventually(Duration::from_secs(30), "the pool settles", || status(&p).reason == "serving");
    std::thread::sleep(Duration::from_secs(2));
    let c = calls(&p.http_get(61780, "/metrics").unwrap());
    let mutating: f64 = c.iter().filter(|(op, _)| MUTATING.contains(&op.as_str())).map(|(_, n)| n).sum();
    let describe: f64 = c.iter().filter(|(op, _)| !MUTATING.contains(&op.as_str())).map(|(_, n)| n).sum();
    let detail = c.iter().map(|(op, n)| format!("{op} {n}")).collect::<Vec<_>>().join(", ");
    (mutating, describe, detail)
}

/// The shipped `underway` CNI binary (`cargo build-cni`: release, static), checked to be newer than
/// its sources.
fn cni_binary() -> String {
    let bin = underway_tests::ipamd::shipped_cni_path().unwrap_or_else(|e| panic!("{e}"));
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["cni/src", "ipamd/api/src", "routes/src"] {
        for f in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            let changed = f.metadata().and_then(|m| m.modified()).unwrap();
            assert!(
                changed <= built,
                "{} is older than {}: run `cargo build-cni` first",
                bin.display(),
                f.path().display()
            );
        }
    }
    bin.display().to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A Prometheus histogram's `_sum` over all its series (e.g. seconds spent in cloud calls).
fn histogram_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}_sum")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The two plugins side by side: underway (the release CNI binary, talking to `p`) and Debian's
/// ptp + host-local (its state in a temporary directory, removed by the caller).
struct Plugins {
    bins: [String; 2],
    confs: [String; 2],
    host_local: std::path::PathBuf,
}

impl Plugins {
    fn new(p: &underway_tests::ipamd::IpamdProcess) -> Plugins {
        let host_local = std::env::temp_dir().join(format!("underway-bench-hl-{}", std::process::id()));
        let confs = [
            serde_json::json!({"cniVersion": "1.0.0", "name": "underway", "type": "underway", "ipamdSocket": p.socket})
                .to_string(),
            serde_json::json!({"cniVersion": "1.0.0", "name": "ptpbench", "type": "ptp", "ipMasq": false,
                "ipam": {"type": "host-local", "subnet": "10.98.0.0/16", "dataDir": host_local}})
            .to_string(),
        ];
        Plugins { bins: [cni_binary(), "/usr/lib/cni/ptp".into()], confs, host_local }
    }
}

/// ADD and DEL through the underway CNI binary and this (release) ipamd on a test-world node,
/// the store on disk, against Debian's ptp + host-local in the same node namespace: `n` cycles,
/// alternating which plugin goes first, a fresh pod netns per cycle (not timed). Also times
/// `ip link del` of a veth pair into a pod netns: DEL's own work is DEL minus that.
async fn add_del(n: usize) {
    println!(
        "\n## CNI ADD/DEL through the real ipamd (release, store on disk) vs ptp + host-local, {n} cycles \
         (targets: ADD ≤ 0.5× at p50 and p99; DEL's own work above the veth teardown ≤ 3 ms at p50)"
    );
    let (w, node) = world("m5.4xlarge").await;
    // The release hold at its default (30 s), not FAST's 1 s: one pod after another, the address
    // whose cooldown ended is taken again instead of going back to EC2 and coming again.
    let cfg = "cooldown_ms = 1000\nadd_wait_ms = 10000\nreconcile_interval_ms = 500\n[targets]\nwarm_ip_target = 10\n";
    let p = start(&w, &node, cfg);
    p.wait_ready(10, Duration::from_secs(60)).unwrap();
    // One pod at a time never needs another ENI: the world's polling would only take CPU.
    eventually(Duration::from_secs(30), "the pool settles", || status(&p).reason == "serving");
    w.stop_sync_loop();
    let ns = std::fs::File::open(format!("/run/netns/{}", node.ns)).unwrap();
    let Plugins { bins, confs, host_local } = Plugins::new(&p);
    let mut times: [[Vec<Duration>; 2]; 2] = Default::default();
    let mut veth_del = Vec::new();
    let before = p.http_get(61780, "/metrics").unwrap();
    for i in 0..n {
        for k in 0..2 {
            let which = (i + k) % 2;
            let pod = TempNs::new("bpod").unwrap();
            let netns = pod.path().display().to_string();
            let id = format!("bench{i}");
            times[which][0].push(timed_in(&ns, plugin_command(&bins[which], "ADD", &id, &netns), &confs[which]));
            times[which][1].push(timed_in(&ns, plugin_command(&bins[which], "DEL", &id, &netns), &confs[which]));
        }
        let pod = TempNs::new("bveth").unwrap();
        let veth = format!("bv{i}");
        underway_tests::netns::ip_in(
            &node.ns,
            &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.0],
        )
        .unwrap();
        let mut del = std::process::Command::new("ip");
        del.args(["link", "del", &veth]);
        veth_del.push(timed_in(&ns, del, ""));
    }
    let _ = std::fs::remove_dir_all(&host_local);
    let after = p.http_get(61780, "/metrics").unwrap();
    let mut rows = Vec::new();
    // DEL's own work cycle by cycle: each underway DEL less the `ip link del` of the same cycle
    // (a median of differences moves less than a difference of medians: both are ~30 ms of the
    // kernel's veth teardown, which varies by milliseconds).
    let mut own: Vec<f64> = times[0][1].iter().zip(&veth_del).map(|(d, v)| ms(*d) - ms(*v)).collect();
    own.sort_by(f64::total_cmp);
    let own_p50 = own[own.len() / 2];
    for (name, [add, del]) in ["underway + ipamd", "ptp + host-local"].iter().zip(times.iter_mut()) {
        let f = [quantile(add, 0.5), quantile(add, 0.99), quantile(del, 0.5), quantile(del, 0.99)];
        println!(
            "{name:<18} ADD p50 {:>5.1} ms  p99 {:>5.1} ms   DEL p50 {:>5.1} ms  p99 {:>5.1} ms",
            ms(f[0]),
            ms(f[1]),
            ms(f[2]),
            ms(f[3])
        );
        rows.push(f);
    }
    let veth = quantile(&mut veth_del, 0.5);
    let (u, r) = (rows[0], rows[1]);
    println!(
        "ratio underway/ptp: ADD p50 {:.2}  ADD p99 {:.2}  DEL p50 {:.2}  DEL p99 {:.2}",
        ms(u[0]) / ms(r[0]),
        ms(u[1]) / ms(r[1]),
        ms(u[2]) / ms(r[2]),
        ms(u[3]) / ms(r[3])
    );
    println!(
        "`ip link del` of a pod's veth pair: p50 {:.1} ms → underway DEL's own work {:.1} ms at p50 \
         (difference of medians); median of the per-cycle differences {own_p50:.1} ms (ratio to 3 ms: {:.2})",
        ms(veth),
        ms(u[2]) - ms(veth),
        own_p50 / 3.0
    );
    let adds = sample(&after, "underway_add_seconds_count{result=\"ok\"}").unwrap_or(0.0)
        - sample(&before, "underway_add_seconds_count{result=\"ok\"}").unwrap_or(0.0);
    let inside = sample(&after, "underway_add_seconds_sum{result=\"ok\"}").unwrap_or(0.0)
        - sample(&before, "underway_add_seconds_sum{result=\"ok\"}").unwrap_or(0.0);
    println!(
        "inside ipamd (request in → durable answer out): mean {:.2} ms over {adds} Adds",
        inside / adds.max(1.0) * 1000.0
    );
    let (ca, cb) = (calls(&after), calls(&before));
    let during: Vec<String> = ca
        .iter()
        .map(|(op, n)| (op, n - cb.iter().find(|(o, _)| o == op).map_or(0.0, |(_, m)| *m)))
        .filter(|(_, n)| *n > 0.0)
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    println!(
        "EC2 calls by ipamd during the cycles: {}",
        if during.is_empty() { "none".into() } else { during.join(", ") }
    );
}

/// `n` concurrent CNI ADDs on a node whose pool is cold (`warm_eni_target = 0`, nothing warm),
/// so the pool grows through several ENIs while they wait, against `n` concurrent ptp ADDs.
async fn burst(n: usize) {
    println!(
        "\n## {n} concurrent CNI ADDs from a cold pool (m5.4xlarge: 30 addresses per ENI; all must succeed), vs ptp + host-local"
    );
    let (w, node) = world("m5.4xlarge").await;
    let m = start_measured(&w, &node, &format!("{FAST}[targets]\nwarm_eni_target = 0\n"), &[]);
    let p = &m.p;
    p.wait_ready(0, Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let free = status(p).free;
    let idle = rss_kib(p.pid().unwrap());
    let ns = std::fs::File::open(format!("/run/netns/{}", node.ns)).unwrap();
    let Plugins { bins, confs, host_local } = Plugins::new(p);
    let before = p.http_get(61780, "/metrics").unwrap();
    let mut walls = [Duration::ZERO; 2];
    for which in 0..2 {
        let pods: Vec<TempNs> = (0..n).map(|_| TempNs::new("burst").unwrap()).collect();
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for (i, pod) in pods.iter().enumerate() {
                let (ns, bin, conf) = (&ns, bins[which].as_str(), &confs[which]);
                s.spawn(move || {
                    let netns = pod.path().display().to_string();
                    timed_in(ns, plugin_command(bin, "ADD", &format!("burst{i}"), &netns), conf)
                });
            }
        });
        walls[which] = t0.elapsed();
        std::thread::scope(|s| {
            for (i, pod) in pods.iter().enumerate() {
                let (ns, bin, conf) = (&ns, bins[which].as_str(), &confs[which]);
                s.spawn(move || {
                    let netns = pod.path().display().to_string();
                    timed_in(ns, plugin_command(bin, "DEL", &format!("burst{i}"), &netns), conf)
                });
            }
        });
    }
    let _ = std::fs::remove_dir_all(&host_local);
    let after = p.http_get(61780, "/metrics").unwrap();
    let delta = |a: &[(String, f64)], b: &[(String, f64)], op: &str| {
        a.iter().find(|(o, _)| o == op).map_or(0.0, |x| x.1) - b.iter().find(|(o, _)| o == op).map_or(0.0, |x| x.1)
    };
    let (ca, cb) = (calls(&after), calls(&before));
    let ops: Vec<String> = ca.iter().map(|(o, _)| o.clone()).collect();
    let mutating: f64 = ops.iter().filter(|o| MUTATING.contains(&o.as_str())).map(|o| delta(&ca, &cb, o)).sum();
    let describe: f64 = ops.iter().filter(|o| !MUTATING.contains(&o.as_str())).map(|o| delta(&ca, &cb, o)).sum();
    let ec2_secs =
        histogram_sum(&after, "underway_cloud_call_seconds") - histogram_sum(&before, "underway_cloud_call_seconds");
    println!(
        "underway: all {n} succeeded in {:.2} s ({free} free at the start); ptp + host-local {:.2} s; ratio {:.2}",
        walls[0].as_secs_f64(),
        walls[1].as_secs_f64(),
        walls[0].as_secs_f64() / walls[1].as_secs_f64()
    );
    println!(
        "EC2 during the burst and its release: {mutating} mutating + {describe} describe calls, {:.2} s in calls ({:.0} % of the underway wall)",
        ec2_secs,
        ec2_secs / walls[0].as_secs_f64() * 100.0
    );
    std::thread::sleep(Duration::from_secs(3));
    let soon = (rss_kib(p.pid().unwrap()), split(p.pid().unwrap()));
    // ipamd hands freed memory back every 10 s (memory.rs); tokio's idle blocking threads end after 10 s.
    std::thread::sleep(Duration::from_secs(12));
    println!(
        "RSS: {:.1} MiB before the burst; {:.1} MiB 3 s after its DELs ({}); {:.1} MiB 15 s after ({})",
        idle as f64 / 1024.0,
        soon.0 as f64 / 1024.0,
        soon.1,
        rss_kib(p.pid().unwrap()) as f64 / 1024.0,
        split(p.pid().unwrap())
    );
    println!("15 s after: {}", memory(&m));
}

/// One durable save of a snapshot with 250 assignments, as the store does it (format 3: `pwrite`
/// into the older slot + `fdatasync`) against format 2's way (the whole file to a temporary,
/// fsync, rename over, fsync the directory), 500 each, alternating, in a directory on the disk
/// (`std::env::temp_dir()`; /tmp is on the root disk here).
fn store(n: usize) {
    use underway_ipamd::pool::Pool;
    use underway_ipamd::store::{PodRecord, Snapshot, Store};
    println!("\n## One durable save, 250 assignments: in place (format 3) vs rewrite + rename (format 2), {n} each");
    let mut pool = Pool::new(0);
    for e in 0..9u32 {
        pool.add_eni(&format!("eni-{e}"), e, (e > 0).then_some(100 + e));
        let ips: Vec<std::net::Ipv4Addr> =
            (0..29u32).map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + e * 256 + i + 10)).collect();
        pool.add_addresses(&format!("eni-{e}"), &ips).unwrap();
    }
    let mut pods = Vec::new();
    for i in 0..250 {
        let k = key(&format!("pod-{i:03}"));
        pool.assign(&k, 0).unwrap();
        pods.push(PodRecord {
            key: k,
            namespace: Some("default".into()),
            name: Some(format!("web-7d9f8c6b5-{i:05}")),
            assigned_at: 1_764_000_000_000 + i,
            netns: Some(format!("/var/run/netns/cni-{i:08x}-0000-0000-0000-000000000000")),
        });
    }
    let snap = Snapshot { mode: None, enis: pool.blocks().cloned().collect(), pods };
    let json = serde_json::to_vec(&snap).unwrap();
    let dir = std::env::temp_dir().join(format!("underway-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let slots = Store::open(&dir.join("slots")).unwrap();
    let renamed = dir.join("renamed");
    std::fs::create_dir_all(&renamed).unwrap();
    let rename_save = |bytes: &[u8]| {
        use std::io::Write;
        let tmp = renamed.join("ipamd-state.tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, renamed.join("ipamd-state")).unwrap();
        std::fs::File::open(&renamed).unwrap().sync_all().unwrap();
    };
    slots.save(&snap).unwrap(); // makes the file; the saves below are in place
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..n {
        for k in 0..2 {
            let t = Instant::now();
            if (i + k) % 2 == 0 {
                slots.save(&snap).unwrap();
                a.push(t.elapsed());
            } else {
                // Format 2 serialised the same JSON (and a header) on every save too.
                rename_save(&serde_json::to_vec(&snap).unwrap());
                b.push(t.elapsed());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (a50, a99, b50, b99) =
        (quantile(&mut a, 0.5), quantile(&mut a, 0.99), quantile(&mut b, 0.5), quantile(&mut b, 0.99));
    println!(
        "snapshot {} KiB: in place p50 {:.2} ms p99 {:.2} ms; rewrite + rename p50 {:.2} ms p99 {:.2} ms (ratio {:.2} / {:.2})",
        json.len() / 1024,
        ms(a50),
        ms(a99),
        ms(b50),
        ms(b99),
        ms(a50) / ms(b50),
        ms(a99) / ms(b99)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |s: &str| named.is_empty() || named.iter().any(|n| n == s);
    if want("store") {
        store(500);
    }
    if want("add_del") {
        add_del(100).await;
    }
    if want("burst") {
        burst(110).await;
    }
    if !(want("calls") || want("rss") || want("kubernetes")) {
        return;
    }
    if want("calls") {
        println!("## EC2 calls for 100 pods from an empty node (target: ≤ 10 mutating)");
        for (ty, extra, label) in [
            ("m5.4xlarge", "", "default targets (warm_eni_target = 1)"),
            ("m5.4xlarge", "[targets]\nwarm_ip_target = 10\n", "warm_ip_target = 10"),
            ("m5.24xlarge", "", "default targets (warm_eni_target = 1)"),
        ] {
            let (m, d, detail) = ec2_calls_for_100_pods(ty, extra).await;
            println!("{ty}, {label}: {m} mutating (ratio to target {:.2}), {d} describe — {detail}", m / 10.0);
        }
    }
    if want("rss") {
        println!("\n## RSS with 250 assignments and restart → serving (targets: ≤ 20 MiB, ≤ 200 ms)");
        let (w, n) = world("m5.24xlarge").await;
        let mut m = start_measured(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 10\n"), &[]);
        let p = &mut m.p;
        p.wait_ready(10, Duration::from_secs(60)).unwrap();
        let idle = rss_kib(p.pid().unwrap());
        pods(p, "r", 250);
        std::thread::sleep(Duration::from_secs(2));
        let full = rss_kib(p.pid().unwrap());
        println!(
            "RSS: {:.1} MiB idle, {:.1} MiB with 250 assignments (ratio to 20 MiB: {:.2}; {})",
            idle as f64 / 1024.0,
            full as f64 / 1024.0,
            full as f64 / 1024.0 / 20.0,
            split(p.pid().unwrap())
        );
        println!("with 250 assignments: {}", memory(&m));
        let p = &mut m.p;
        let mut first = Vec::new();
        let mut synced = Vec::new();
        for _ in 0..5 {
            p.kill9();
            let t = Instant::now();
            p.spawn().unwrap();
            while !matches!(p.call(&Request::Check(key("r00-0"))), Ok(Response::Checked(_))) {
                std::thread::sleep(Duration::from_millis(2));
            }
            first.push(t.elapsed());
            while status(p).reason != "serving" {
                std::thread::sleep(Duration::from_millis(5));
            }
            synced.push(t.elapsed());
        }
        first.sort();
        synced.sort();
        let med = |v: &[Duration]| v[v.len() / 2].as_secs_f64() * 1000.0;
        println!(
            "restart (SIGKILL) → answering from the store: median {:.0} ms of 5 (ratio to 200 ms: {:.2}); → synced with EC2 and the host: median {:.0} ms",
            med(&first),
            med(&first) / 200.0,
            med(&synced)
        );
        let rss_after = rss_kib(p.pid().unwrap());
        println!("RSS after the restarts (250 assignments from the store): {:.1} MiB", rss_after as f64 / 1024.0);

        drop(m);
        drop(w);
    }
    if want("kubernetes") {
        println!(
            "\n## RSS with the Kubernetes side on, by cluster size (target: ≤ 20 MiB, not growing with the cluster)"
        );
        for nodes in [10, 5000] {
            let (rss, parts, requests, all) = rss_with_kubernetes(nodes).await;
            println!(
                "{nodes} Nodes: RSS {:.1} MiB with its Node watched, the Lease held and 250 assignments (ratio to 20 MiB: {:.2}; {parts}); {requests} API requests; {all}",
                rss as f64 / 1024.0,
                rss as f64 / 1024.0 / 20.0
            );
        }
    }
}

/// ipamd with its Kubernetes side against a stand-in API server holding `nodes` Nodes: its RSS
/// (KiB) with 250 assignments, its split, how many requests it made, and [`memory`]'s line.
async fn rss_with_kubernetes(nodes: usize) -> (u64, String, usize, String) {
    let (w, n) = world("m5.24xlarge").await;
    let api = underway_tests::apiserver::FakeApiServer::in_ns(&n.ns).unwrap();
    for i in 0..nodes {
        api.put_node(serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{i}"), "resourceVersion": "1", "labels": {"underway.dev/pool": "general"}},
            "spec": {"podCIDR": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)}}));
    }
    api.put_pool(serde_json::json!({"apiVersion": "underway.dev/v1alpha1", "kind": "UnderwayPool",
        "metadata": {"name": "general"}, "spec": {"mode": "eni", "targets": {"warm_ip_target": 10}}}));
    let extra = format!("{FAST}[kubernetes]\nenabled = true\nnode_name = \"node-7\"\n");
    let kc = api.kubeconfig_path();
    let env = [("KUBECONFIG", kc.as_str())];
    let m = start_measured(&w, &n, &extra, &env);
    let p = &m.p;
    p.wait_ready(10, Duration::from_secs(60)).unwrap();
    pods(p, "k", 250);
    std::thread::sleep(Duration::from_secs(6)); // a Lease round or two
    let rss = rss_kib(p.pid().unwrap());
    let parts = split(p.pid().unwrap());
    let all = memory(&m);
    (rss, parts, api.requests().len(), all)
}
