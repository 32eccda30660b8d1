//! The CNI binary and ipamd together on one test-world node, as a runtime drives them: real
//! binaries, real socket, real namespaces, LocalStack behind. Needs root, and the workspace's
//! binaries built (`tests/run` builds them).

mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use support::*;
use underway_api::{Request, Response};
use underway_tests::netns::TempNs;

/// Runs `f` for every pod in parallel.
fn each<T: Send>(pods: &[(String, TempNs)], f: impl Fn(&str, &TempNs) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = pods.iter().map(|(id, ns)| s.spawn(|| f(id, ns))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_pods_in_parallel_then_a_lost_store_then_all_deleted() {
    // m5.xlarge: 4 ENIs × 14 secondary addresses; 30 pods need the primary and two more ENIs.
    let (w, n) = world("m5.xlarge").await;
    let mut p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 3\n"));
    p.wait_ready(3, Duration::from_secs(60)).unwrap();
    let c = conf(&p);
    let pods: Vec<(String, TempNs)> =
        (0..30).map(|i| (format!("c{i:02}{}", std::process::id()), TempNs::new(&format!("p{i}")).unwrap())).collect();

    let adds = each(&pods, |id, ns| cni(&n.ns, "ADD", id, &ns.path().display().to_string(), &c));
    for (i, (code, v)) in adds.iter().enumerate() {
        assert_eq!(*code, 0, "pod {i}: {v}");
    }
    let addrs: Vec<Ipv4Addr> = adds.iter().map(|(_, v)| address(v)).collect();
    assert_eq!(addrs.iter().collect::<BTreeSet<_>>().len(), 30, "30 distinct addresses: {addrs:?}");
    let enis = enis_in_ec2(&w, &n).await;
    assert!(enis.len() >= 3, "30 pods need three ENIs: {enis:?}");
    for a in &addrs {
        assert!(enis.iter().any(|e| e.2.contains(a)), "{a} is a secondary address of one of the node's ENIs");
    }

    let check = |c: &str| each(&pods, |id, ns| cni(&n.ns, "CHECK", id, &ns.path().display().to_string(), c).0);
    assert!(check(&c).iter().all(|code| *code == 0), "CHECK passes for every pod");
    // Every pod reaches the VPC router through its own ENI (the router drops foreign sources).
    let pings = each(&pods, |_, ns| ns.sh("ping -c 1 -W 2 10.0.0.1").0);
    if !pings.iter().all(|ok| *ok) {
        let sh = |ns: &str, c: &str| {
            String::from_utf8_lossy(&underway_tests::netns::exec(ns, &["sh", "-c", c]).unwrap().stdout).to_string()
        };
        let bad: Vec<_> = pings.iter().zip(&addrs).filter(|(ok, _)| !**ok).map(|(_, a)| a).collect();
        panic!(
            "pods that cannot reach the VPC router: {bad:?}\nnode:\n{}\nrouter:\n{}\ndrops {}",
            sh(
                &n.ns,
                &format!(
                    "ip route get 10.0.0.1 from {a} iif $(ip -o route get {a} | sed 's/.* dev \\([^ ]*\\).*/\\1/') 2>&1; ip -o route get {a}; sysctl -a 2>/dev/null | grep -E 'rp_filter|forwarding' | grep -E 'eth1|default|all'",
                    a = bad[0]
                )
            ),
            sh(w.router_ns(), "ip -br link; ip route; nft list ruleset | head -50"),
            w.source_check_drops().unwrap()
        );
    }
    assert_eq!(w.source_check_drops().unwrap(), 0, "nothing left through the wrong ENI");

    // The store is lost while the pods run: ipamd rebuilds from EC2 and the host's veths.
    p.kill9();
    std::fs::write(p.dir.join("state/ipamd-state"), b"garbage").unwrap();
    p.spawn().unwrap();
    p.wait_ready(0, Duration::from_secs(60)).unwrap();
    assert!(check(&c).iter().all(|code| *code == 0), "CHECK still passes: the host's pods were recovered");
    let late: Vec<Ipv4Addr> = add_parallel(&p, "late", 5).into_iter().map(|(_, r)| added(r).address).collect();
    for a in &late {
        assert!(!addrs.contains(a), "{a} is held by a running pod; handed out twice");
    }

    let dels = each(&pods, |id, ns| cni(&n.ns, "DEL", id, &ns.path().display().to_string(), &c).0);
    assert!(dels.iter().all(|code| *code == 0));
    for i in 0..5 {
        assert_eq!(p.call(&Request::Del(key(&format!("late-{i}")))).unwrap(), Response::Released { found: true });
    }
    assert_eq!(n.exec(&["sh", "-c", "ip -br link | grep -c '^uw' || true"]).unwrap().stdout, b"0\n");
    // Back to the target: 3 free, nothing assigned, and EC2 holds just those.
    eventually(Duration::from_secs(30), "the pool returns to warm_ip_target", || {
        let s = status(&p);
        s.free == 3 && s.assigned == 0
    });
    let mut held = 0;
    for _ in 0..100 {
        held = enis_in_ec2(&w, &n).await.iter().map(|e| e.2.len()).sum::<usize>();
        if held == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(held, 3, "surplus addresses went back to EC2: {}", p.http_get(61781, "/v1/enis").unwrap());
}

/// Issue 14, item 1: after a lost store, Adds fired the moment the restarted ipamd listens (a
/// kubelet retrying) must never get an address a running pod holds. Before the fix, `sync` offered
/// every ENI address (waking the parked Adds) before the host check marked the running pods'.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adds_racing_a_rebuild_never_get_a_running_pods_address() {
    let (w, n) = world("m5.large").await;
    let mut p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 2\n"));
    p.wait_ready(2, Duration::from_secs(60)).unwrap();
    let c = conf(&p);
    let pods: Vec<(String, TempNs)> =
        (0..6).map(|i| (format!("r{i:02}{}", std::process::id()), TempNs::new(&format!("r{i}")).unwrap())).collect();
    let adds = each(&pods, |id, ns| cni(&n.ns, "ADD", id, &ns.path().display().to_string(), &c));
    let running: BTreeSet<Ipv4Addr> = adds
        .iter()
        .map(|(code, v)| {
            assert_eq!(*code, 0, "{v}");
            address(v)
        })
        .collect();
    assert_eq!(running.len(), 6);
    // Issue 14, item 2: a second ipamd on the same state directory stops at once, naming the
    // holder, and leaves the live socket alone.
    let second = p.run_cmd_within(Duration::from_secs(20), &["run"]).unwrap();
    let text = String::from_utf8_lossy(&second.stderr).to_string();
    assert_ne!(second.status.code(), Some(124), "a second ipamd kept running: {text}");
    assert!(!second.status.success(), "{text}");
    assert!(text.contains(&format!("another ipamd (pid {})", p.pid().unwrap())), "{text}");
    assert!(matches!(p.call(&Request::Status), Ok(Response::Status(_))), "the first still serves its socket");

    let mut collisions = Vec::new();
    for round in 0..3 {
        p.kill9();
        std::fs::remove_file(p.dir.join("state/ipamd-state")).unwrap();
        let _ = std::fs::remove_file(&p.socket);
        p.spawn().unwrap();
        let t = std::time::Instant::now();
        // The first moment it accepts a connection (the file appears at bind, before listen).
        while std::os::unix::net::UnixStream::connect(&p.socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "the socket never appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
        for (name, r) in add_parallel(&p, &format!("race{round}"), 4) {
            if let Response::Added(a) = r
                && running.contains(&a.address)
            {
                collisions.push(format!("round {round}: {name} got {} of a running pod", a.address));
            }
        }
        p.wait_ready(0, Duration::from_secs(60)).unwrap();
        for i in 0..4 {
            let _ = p.call(&Request::Del(key(&format!("race{round}-{i}"))));
        }
    }
    assert!(collisions.is_empty(), "{collisions:?}");
    let dels = each(&pods, |id, ns| cni(&n.ns, "DEL", id, &ns.path().display().to_string(), &c).0);
    assert!(dels.iter().all(|code| *code == 0));
}
