//! ADD+DEL latency of the underway binary against Debian's ptp + host-local, side by side.
//!
//! `cargo bench -p underway-cni --bench add_del [-- N]` (root; default N = 200). Each cycle makes
//! a fresh pod netns (not timed), then times ADD and DEL of each plugin, alternating which goes
//! first. Both binaries are started directly in the same node namespace (setns before exec).
//! underway talks to the in-test ipamd (warm pool in memory, no fsync): the figure is the CNI
//! binary and its datapath, not ipamd's store. The same comparison through the real ipamd on a
//! test-world node, store on disk, is in `cargo bench -p underway-ipamd --bench node`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use underway_tests::cni::{plugin_command, quantile, timed_in};
use underway_tests::netns::TempNs;

struct Plugin {
    name: &'static str,
    bin: String,
    conf: String,
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn run(node: &std::fs::File, bin: &str, conf: &str, command: &str, id: &str, netns: &str) -> Duration {
    timed_in(node, plugin_command(bin, command, id, netns), conf)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200);
    let ipamd = support::FakeIpamd::start();
    let node = TempNs::new("bench").expect("needs root");
    assert!(node.sh("ip link set lo up").0);
    let node_file = std::fs::File::open(node.path()).unwrap();
    let data_dir = std::env::temp_dir().join(format!("underway-bench-hostlocal-{}", std::process::id()));
    let mut plugins = [
        Plugin {
            name: "underway",
            bin: env!("CARGO_BIN_EXE_underway").into(),
            conf: format!(
                r#"{{"cniVersion":"1.0.0","name":"underway","type":"underway","ipamdSocket":"{}","mtu":1500}}"#,
                ipamd.socket.display()
            ),
            add: vec![],
            del: vec![],
        },
        Plugin {
            name: "ptp+host-local",
            bin: "/usr/lib/cni/ptp".into(),
            conf: format!(
                r#"{{"cniVersion":"1.0.0","name":"ptpbench","type":"ptp","ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.98.0.0/16","dataDir":"{}"}}}}"#,
                data_dir.display()
            ),
            add: vec![],
            del: vec![],
        },
    ];
    for i in 0..n {
        for k in 0..2 {
            let p = &mut plugins[(i + k) % 2];
            let pod = TempNs::new("bpod").unwrap();
            let netns = pod.path().display().to_string();
            let id = format!("bench{i}");
            p.add.push(run(&node_file, &p.bin, &p.conf, "ADD", &id, &netns));
            p.del.push(run(&node_file, &p.bin, &p.conf, "DEL", &id, &netns));
        }
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    println!("{n} ADD+DEL cycles each, alternating, fresh pod netns per cycle");
    println!("{:<16} {:>9} {:>9} {:>9} {:>9}", "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99");
    let mut figs = Vec::new();
    for p in plugins.iter_mut() {
        let f = (
            quantile(&mut p.add, 0.5),
            quantile(&mut p.add, 0.99),
            quantile(&mut p.del, 0.5),
            quantile(&mut p.del, 0.99),
        );
        println!("{:<16} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms", p.name, ms(f.0), ms(f.1), ms(f.2), ms(f.3));
        figs.push(f);
    }
    let (u, r) = (figs[0], figs[1]);
    println!(
        "ratio underway/ptp: ADD p50 {:.2}  ADD p99 {:.2}  DEL p50 {:.2}  DEL p99 {:.2}   (targets: ADD ≤ 0.5, DEL ≤ 0.7)",
        ms(u.0) / ms(r.0),
        ms(u.1) / ms(r.1),
        ms(u.2) / ms(r.2),
        ms(u.3) / ms(r.3)
    );
    assert_eq!(ipamd.assigned(), 0, "every address released");
}
