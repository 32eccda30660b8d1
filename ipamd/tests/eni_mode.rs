//! ipamd in ENI mode on the test world: a real ipamd process per node (inside the node's
//! namespace, with its IMDS and EC2 endpoint), LocalStack behind it, RPC over the real socket.
//! Needs root.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::*;
use underway_api::{ErrorKind, Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_node_reaches_its_targets_with_the_calls_they_imply() {
    let (w, n) = world("m5.large").await;
    // Default targets: warm_eni_target = 1 → one ENI's worth (9 on an m5.large) free.
    let p = start(&w, &n, FAST);
    p.wait_ready(9, Duration::from_secs(60)).unwrap();
    let enis = enis_in_ec2(&w, &n).await;
    assert_eq!(enis.len(), 1, "no second ENI: {enis:?}");
    assert_eq!(enis[0].2.len(), 9, "9 secondary addresses on the primary ENI");
    let m = p.http_get(61780, "/metrics").unwrap();
    let calls = |op: &str| sample(&m, &format!("underway_cloud_calls_total{{operation=\"{op}\",outcome=\"ok\"}}"));
    assert_eq!(calls("AssignPrivateIpAddresses"), Some(1.0), "one batch call fills the target:\n{m}");
    assert_eq!(calls("CreateNetworkInterface"), None, "{m}");
    let eni0 = &enis[0].0;
    assert_eq!(sample(&m, &format!("underway_pool_addresses{{eni=\"{eni0}\",state=\"free\"}}")), Some(9.0), "{m}");
    assert_eq!(sample(&m, "underway_enis_limit"), Some(3.0));
    assert_eq!(sample(&m, "underway_ready"), Some(1.0));
    let v: serde_json::Value = serde_json::from_str(&p.http_get(61781, "/v1/enis").unwrap()).unwrap();
    assert_eq!(v[0]["id"], serde_json::json!(eni0));
    assert_eq!(v[0]["free"], 9);
    let cfg: serde_json::Value = serde_json::from_str(&p.http_get(61781, "/v1/config").unwrap()).unwrap();
    assert_eq!(cfg["cluster"], serde_json::json!(w.id()), "the effective config");
    let st: serde_json::Value = serde_json::from_str(&p.http_get(61781, "/v1/status").unwrap()).unwrap();
    assert_eq!(st["node"]["id"], serde_json::json!(n.instance_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_primary_brings_a_second_eni_whose_addresses_serve() {
    let (w, n) = world("m5.large").await;
    let p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 2\n"));
    p.wait_ready(2, Duration::from_secs(60)).unwrap();
    let answers = add_parallel(&p, "pod", 12);
    let allocs: Vec<_> = answers.into_iter().map(|(_, r)| added(r)).collect();
    let distinct: BTreeSet<_> = allocs.iter().map(|a| a.address).collect();
    assert_eq!(distinct.len(), 12, "every pod its own address");
    let enis = enis_in_ec2(&w, &n).await;
    assert_eq!(enis.len(), 2, "{enis:?}");
    let (eni1, dev1) = (&enis[1].0, enis[1].1);
    assert_eq!(dev1, 1, "the next free device index");
    let on_second: Vec<_> = allocs.iter().filter(|a| a.eni.as_deref() == Some(eni1.as_str())).collect();
    assert!(on_second.len() >= 3, "12 pods on 9 + more: {allocs:?}");
    assert!(on_second.iter().all(|a| a.route_table == Some(101)), "the ENI's table: {on_second:?}");
    for a in &on_second {
        assert!(enis[1].2.contains(&a.address), "{} is owned by {eni1} in EC2", a.address);
    }
    // The link was set up: up, with the ENI's table (subnet + default via the subnet's router).
    // The scrape after real work passes promtool's lint (help on every family, counter names
    // ending in _total), histograms of Add, reconcile and cloud-call latency included.
    let m = p.http_get(61780, "/metrics").unwrap();
    let (clean, said) = promtool_check(&m);
    assert!(clean, "promtool check metrics: {said}\n{m}");
    for family in
        ["underway_add_seconds_bucket", "underway_reconcile_seconds_bucket", "underway_cloud_call_seconds_bucket"]
    {
        assert!(m.contains(family), "{family} in\n{m}");
    }
    assert!(
        m.contains("underway_cloud_call_seconds_count{operation=\"CreateNetworkInterface\"} 1"),
        "one timed attempt per call:\n{m}"
    );
    // The operator's views of the same ipamd: 12 pods, 2 ENIs, 12 routes each on its ENI's table
    // and routed by a host veth... except that no CNI ran here, so every host route is MISSING.
    let cmd = |args: &[&str]| {
        let out = p.run_cmd(args).unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let pods = cmd(&["pods"]);
    assert!(pods.starts_with("ADDRESS ") && pods.lines().count() == 13, "{pods}");
    assert!(pods.contains("default/pod"), "{pods}");
    let json: serde_json::Value = serde_json::from_str(&cmd(&["pods", "-o", "json"])).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(12));
    let enis_out = cmd(&["enis"]);
    assert_eq!(enis_out.lines().count(), 3, "{enis_out}");
    assert!(enis_out.contains(eni1.as_str()) && enis_out.contains(" 101 "), "{enis_out}");
    let routes_out = cmd(&["routes"]);
    assert_eq!(routes_out.lines().filter(|l| l.ends_with("MISSING")).count(), 12, "{routes_out}");
    assert_eq!(routes_out.lines().filter(|l| l.contains(" 101 ")).count(), on_second.len(), "{routes_out}");
    let pool_out = cmd(&["pool"]);
    assert!(pool_out.starts_with("ready:    yes") && pool_out.contains("enis:     2"), "{pool_out}");
    assert!(cmd(&["errors"]).starts_with("AGO "));
    // The lint is real: a family without its help text fails it.
    let no_help: String =
        m.lines().filter(|l| !l.starts_with("# HELP underway_cloud_throttles")).map(|l| format!("{l}\n")).collect();
    assert!(!promtool_check(&no_help).0, "promtool must refuse a family without help");
    let out = n.exec(&["ip", "route", "show", "table", "101"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("default via 10.0.0.1 dev eth1"), "table 101: {table}");
    let link = String::from_utf8_lossy(&n.exec(&["ip", "link", "show", "eth1"]).unwrap().stdout).to_string();
    assert!(link.contains("state UP") || link.contains(",UP"), "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instance_limits_are_enforced_and_add_says_so() {
    // t3.micro: 2 ENIs × 2 IPv4 (1 secondary each). LocalStack would accept far more.
    let (w, n) = world("t3.micro").await;
    let p = start(
        &w,
        &n,
        "cooldown_ms = 1000\nadd_wait_ms = 3000\nreconcile_interval_ms = 500\n[targets]\nwarm_ip_target = 1\nminimum_ip_target = 3\n",
    );
    // The minimum cannot be met: ipamd fills what the type allows and says why it stops there.
    eventually(Duration::from_secs(60), "both addresses the type allows, and the limit named", || {
        p.call(&Request::Status)
            .is_ok_and(|r| matches!(r, Response::Status(s) if s.ready && s.free == 2 && s.reason.contains("ENI limit")))
    });
    let errors = p.http_get(61781, "/v1/errors").unwrap();
    assert!(
        errors.contains("minimum_ip_target = 3 can never be met") && errors.contains("at most 2 addresses"),
        "an unreachable target is reported at start with its numbers: {errors}"
    );
    let a = added(add(&p, "a"));
    let b = added(add(&p, "b"));
    assert_ne!(a.address, b.address);
    let t = Instant::now();
    match add(&p, "c") {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::EniLimitReached, "{e:?}");
            assert!(e.message.contains("t3.micro") && e.message.contains("2 ENIs"), "{}", e.message);
        }
        other => panic!("a third address on a t3.micro: {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(2500), "it waited its bounded time first");
    let enis = enis_in_ec2(&w, &n).await;
    assert_eq!(enis.len(), 2, "no ENI beyond the type's maximum: {enis:?}");
    assert!(enis.iter().all(|e| e.2.len() <= 1), "no address beyond the per-ENI maximum: {enis:?}");
    let st = status(&p);
    assert!(st.reason.contains("ENI limit"), "{st:?}");
    // A DEL frees one; after the cooldown it serves again.
    assert_eq!(p.call(&Request::Del(key("a"))).unwrap(), Response::Released { found: true });
    assert_eq!(p.call(&Request::Del(key("a"))).unwrap(), Response::Released { found: false }, "unknown is success");
    let c = added(add(&p, "c"));
    assert_eq!(c.address, a.address, "the only free address, after its cooldown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_assignments_survive_a_kill_and_a_corrupt_store_is_survived() {
    let (w, n) = world("m5.4xlarge").await;
    let mut p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 5\n"));
    p.wait_ready(5, Duration::from_secs(60)).unwrap();
    let first: Vec<_> = add_parallel(&p, "pod", 50).into_iter().map(|(c, r)| (c, added(r).address)).collect();
    assert_eq!(first.iter().map(|(_, a)| a).collect::<BTreeSet<_>>().len(), 50);
    p.kill9();
    p.spawn().unwrap();
    // It answers from the store at once, before the cloud is reached.
    eventually(Duration::from_secs(20), "ipamd answers after the restart", || {
        p.call(&Request::Check(key("pod-0"))).is_ok()
    });
    for (c, addr) in &first {
        match p.call(&Request::Check(key(c))).unwrap() {
            Response::Checked(a) => assert_eq!(a.address, *addr, "{c} keeps its address"),
            other => panic!("{c}: {other:?}"),
        }
    }
    let more: Vec<_> = add_parallel(&p, "late", 10).into_iter().map(|(_, r)| added(r).address).collect();
    let all: BTreeSet<_> = first.iter().map(|(_, a)| *a).chain(more.iter().copied()).collect();
    assert_eq!(all.len(), 60, "no address handed out twice after the restart");
    // Same again as a re-ADD of an existing attachment: the same address.
    assert_eq!(added(add(&p, "pod-7")).address, first[7].1);

    // A store cut short (neither slot whole; a torn newest slot alone falls back to the other,
    // store.rs's tests): ipamd must start, say so, and rebuild from EC2 (no pods on the host here).
    p.kill9();
    let store = p.dir.join("state/ipamd-state");
    let bytes = std::fs::read(&store).unwrap();
    std::fs::write(&store, &bytes[..4096 + 100]).unwrap();
    p.spawn().unwrap();
    p.wait_ready(5, Duration::from_secs(60)).unwrap();
    let errors = p.http_get(61781, "/v1/errors").unwrap();
    assert!(errors.contains("corrupt") && errors.contains("neither slot holds a whole snapshot"), "{errors}");
    let kept: Vec<_> = std::fs::read_dir(p.dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert_eq!(kept.len(), 1, "the corrupt file is kept for a post-mortem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_on_an_empty_pool_waits_out_a_slow_ec2() {
    let (w, n) = world("m5.large").await;
    // No warm addresses at all: every Add needs EC2.
    // (warm_eni_target = 0: an IP target of 0 means unset, as in the AWS VPC CNI, which would
    // bring a whole warm ENI.)
    let p = start(&w, &n, &format!("{FAST}[targets]\nwarm_eni_target = 0\n"));
    p.wait_ready(0, Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_secs(1)); // the reconciler has had its say: still nothing warm
    assert_eq!(status(&p).free, 0);
    // Every EC2 request of the account takes 2.5 s (the front's latency: per request, as the SDK
    // keeps its connection to the front open).
    w.account().front.configure(|c| c.faults.latency = Duration::from_millis(2500));
    let t = Instant::now();
    let a = added(add(&p, "slow"));
    let took = t.elapsed();
    w.account().front.configure(|c| c.faults.latency = Duration::ZERO);
    // Not a speed figure: proof that the Add really met the stall. That it got an address at
    // all shows it stayed within its wait (ipamd fails an Add once add_wait_ms has passed).
    assert!(took >= Duration::from_millis(2500), "the stall was in the way ({took:?}); got {}", a.address);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exhausted_subnet_fails_add_with_that_reason() {
    let (w, n) = world("m5.large").await;
    let fx = w.ec2();
    // A /28 for new ENIs, filled to the last address by someone else (a full subnet hangs
    // LocalStack, so ipamd must not ask it for more than DescribeSubnets says is there).
    let (small, _) = fx.subnet("10.0.200.0/28").await;
    let free = |s: &str| {
        let (c, s) = (fx.client.clone(), s.to_string());
        async move {
            let o = c.describe_subnets().subnet_ids(s).send().await.unwrap();
            o.subnets()[0].available_ip_address_count().unwrap()
        }
    };
    let left = free(&small).await;
    fx.client
        .create_network_interface()
        .subnet_id(&small)
        .secondary_private_ip_address_count(left - 1)
        .send()
        .await
        .unwrap();
    assert_eq!(free(&small).await, 0);
    let p = start(
        &w,
        &n,
        &format!(
            "cooldown_ms = 1000\nadd_wait_ms = 3000\nreconcile_interval_ms = 500\n[targets]\nminimum_ip_target = 9\nwarm_ip_target = 0\n[eni]\nsubnets = [\"{small}\"]\n"
        ),
    );
    p.wait_ready(9, Duration::from_secs(60)).unwrap();
    let got: Vec<_> = add_parallel(&p, "fill", 9).into_iter().map(|(_, r)| added(r)).collect();
    assert_eq!(got.len(), 9);
    match add(&p, "one-more") {
        Response::Error(e) => {
            assert_eq!(e.kind, ErrorKind::SubnetExhausted, "{e:?}");
            assert!(e.message.contains(&small) && e.message.contains("0 free"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(enis_in_ec2(&w, &n).await.len(), 1, "no ENI was created in the full subnet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_deletes_this_nodes_leaked_enis_and_releases_stale_attachments() {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let (w, n) = world("m5.large").await;
    let fx = w.ec2();
    let make = |cluster: String, instance: String| {
        let c = fx.client.clone();
        let subnet = fx.subnet_id.clone();
        async move {
            let tags = TagSpecification::builder()
                .resource_type(ResourceType::NetworkInterface)
                .tags(Tag::builder().key(underway_cloud::TAG_CLUSTER).value(cluster).build())
                .tags(Tag::builder().key(underway_cloud::TAG_INSTANCE).value(instance).build())
                .tags(Tag::builder().key(underway_cloud::TAG_CREATED_AT).value("1").build())
                .build();
            let o = c.create_network_interface().subnet_id(subnet).tag_specifications(tags).send().await.unwrap();
            o.network_interface().unwrap().network_interface_id().unwrap().to_string()
        }
    };
    let leaked = make(w.id().to_string(), n.instance_id.clone()).await;
    let in_use = make(w.id().to_string(), n.instance_id.clone()).await;
    let foreign = make("another-cluster".into(), n.instance_id.clone()).await;
    fx.client
        .attach_network_interface()
        .network_interface_id(&in_use)
        .instance_id(&n.instance_id)
        .device_index(1)
        .send()
        .await
        .unwrap();
    let p = start(&w, &n, &format!("{FAST}[eni]\nleak_grace_ms = 0\ngc_interval_ms = 300\n"));
    p.wait_ready(1, Duration::from_secs(60)).unwrap();
    let exists = |id: String| {
        let c = fx.client.clone();
        async move { c.describe_network_interfaces().network_interface_ids(id).send().await.is_ok() }
    };
    let mut gone = false;
    for _ in 0..50 {
        if !exists(leaked.clone()).await {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the detached ENI this cluster made for this node was deleted");
    assert!(exists(in_use.clone()).await, "an attached ENI is never deleted");
    assert!(exists(foreign.clone()).await, "another cluster's ENI is not ours");
    let m = p.http_get(61780, "/metrics").unwrap();
    assert_eq!(sample(&m, "underway_leaked_enis_deleted_total"), Some(1.0), "{m}");

    // CNI GC: the runtime still has pod a; b and c are stale.
    for c in ["a", "b", "c"] {
        added(add(&p, c));
    }
    let r =
        p.call(&Request::Gc(underway_api::GcRequest { network: "underway".into(), valid: vec![key("a")] })).unwrap();
    match r {
        Response::Collected { released } => assert_eq!(released.len(), 2, "{released:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(p.call(&Request::Check(key("a"))).unwrap(), Response::Checked(_)));
    assert!(
        matches!(p.call(&Request::Check(key("b"))).unwrap(), Response::Error(e) if e.kind == ErrorKind::UnknownAttachment)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cni_config_is_installed_only_once_ipamd_serves() {
    let (w, n) = world("m5.large").await;
    let dir = std::env::temp_dir().join(format!("underway-cni-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("10-underway.conflist");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s/10-underway.conflist"), &src).unwrap();
    let installed = dir.join("net.d/10-underway.conflist");
    // EC2 is slow: ipamd cannot finish its first sync for a while.
    n.set_ec2_delay(Duration::from_millis(1500));
    let p = start(
        &w,
        &n,
        &format!("{FAST}[cni]\nconf_dir = \"{}\"\nconflist = \"{}\"\n", dir.join("net.d").display(), src.display()),
    );
    eventually(Duration::from_secs(20), "ipamd answers", || p.call(&Request::Status).is_ok());
    let s = status(&p);
    assert_ne!(s.reason, "serving", "{s:?}");
    assert!(!installed.exists(), "no network config before ipamd serves (the node stays NotReady)");
    n.set_ec2_delay(Duration::ZERO);
    p.wait_ready(9, Duration::from_secs(60)).unwrap();
    eventually(Duration::from_secs(5), "the conflist installed", || installed.exists());
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(&src).unwrap());
    let out = p.run_cmd(&["uninstall"]).unwrap();
    assert!(out.status.success() && !installed.exists(), "{}", String::from_utf8_lossy(&out.stdout));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 14, item 4: the attach succeeds but its delete-on-termination call fails (every
/// ModifyNetworkInterfaceAttribute throttled). The ENI is attached: ipamd must track it rather
/// than make another for the same device index (which AWS refuses: the strict front found this
/// in the fault test), report the missing delete-on-termination, and keep asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eni_attached_despite_a_failed_call_is_adopted_not_duplicated() {
    let (w, n) = world("m5.large").await;
    w.account().front.configure(|c| {
        c.faults.throttle = 1.0;
        c.faults.actions = vec!["ModifyNetworkInterfaceAttribute".into()];
    });
    // 12 warm addresses: the primary ENI holds 9, so a second ENI is needed.
    let p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 12\n"));
    p.wait_ready(12, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
    let errors = p.http_get(61781, "/v1/errors").unwrap();
    assert!(errors.contains("delete on termination not set"), "{errors}");
    let in_ec2 = enis_in_ec2(&w, &n).await;
    assert_eq!(in_ec2.len(), 2, "one ENI added, not one per retry: {in_ec2:?}");
    let tracked = p.http_get(61781, "/v1/enis").unwrap();
    for (id, _, _) in &in_ec2 {
        assert!(tracked.contains(id.as_str()), "{id} is in the pool: {tracked}");
    }
    let records = w.account().front.records();
    let created = records.iter().filter(|r| r.action == "CreateNetworkInterface").count();
    assert_eq!(created, 1, "one CreateNetworkInterface");
    assert!(w.account().front.unprovoked().is_empty(), "{:?}", w.account().front.unprovoked());
    // Asked again in later steps, and made once EC2 stops throttling it. (LocalStack does not
    // always keep the flag: the request reaching it is what is checked.)
    let modifies = |ok: bool| {
        w.account()
            .front
            .records()
            .iter()
            .filter(|r| r.action == "ModifyNetworkInterfaceAttribute")
            .filter(|r| !ok || matches!(r.outcome, underway_tests::front::Outcome::Forwarded(200)))
            .count()
    };
    let before = modifies(false);
    eventually(Duration::from_secs(45), "delete on termination asked again", || modifies(false) > before);
    assert_eq!(modifies(true), 0, "none got through while throttled");
    w.account().front.configure(|c| c.faults.throttle = 0.0);
    // Asked again at most every 30 s.
    eventually(Duration::from_secs(45), "delete on termination made", || modifies(true) == 1);
}

/// Issue 14, item 9: the socket directory, socket and state file are as private as claimed (the
/// DaemonSet's host paths are created by the kubelet, 0755), a client that sends nothing is cut
/// off at the read deadline, and a caller that is not root (nor allowed) is refused by its
/// peer credentials even when someone loosened the socket's permissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_socket_and_state_are_private_and_callers_are_checked() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let (w, n) = world("m5.large").await;
    let p = start(&w, &n, &format!("rpc_read_timeout_ms = 500\n{FAST}"));
    p.wait_ready(1, Duration::from_secs(60)).unwrap();
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let sock_dir = p.socket.parent().unwrap().to_path_buf();
    assert_eq!(mode(&sock_dir), 0o700);
    assert_eq!(mode(&p.socket), 0o600);
    assert_eq!(mode(&p.dir.join("state")), 0o700);
    assert_eq!(mode(&p.dir.join("state/ipamd-state")), 0o600);

    // Silent client: closed at the deadline, not held forever.
    let mut silent = std::os::unix::net::UnixStream::connect(&p.socket).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = silent.read_to_end(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(8), "cut off at the deadline, took {:?}", t.elapsed());

    // Someone loosened the permissions: uid 65534 can connect, and is refused by ipamd itself.
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&p.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    // ipamd answers a refused caller at once and closes: the send may meet a closed socket, the
    // answer is read all the same.
    let client = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\ntry:\n    s.sendall(b'{{\"version\":1,\"op\":\"status\"}}\\n')\nexcept OSError:\n    pass\nprint(s.makefile().readline())",
        p.socket.display().to_string()
    );
    let out = std::process::Command::new("setpriv")
        // Debian's python3: a toolchain shim in root's home is out of reach of uid 65534.
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", &client])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("uid 65534 may not call ipamd"), "{text}");
    std::fs::set_permissions(&p.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(matches!(p.call(&Request::Status), Ok(Response::Status(_))), "root still served");
}

/// Issue 14, item 7: liveness follows the reconciler, not the process. With every EC2 request
/// taking 25 s, no step finishes within `health_stall_ms`, and `underway-ipamd health` (the
/// DaemonSet's liveness probe) fails saying so; once EC2 answers again, it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn liveness_fails_while_the_reconciler_is_stalled_and_recovers() {
    let (w, n) = world("m5.large").await;
    let p = start(&w, &n, &format!("health_stall_ms = 10000\n{FAST}[targets]\nwarm_ip_target = 2\n"));
    p.wait_ready(2, Duration::from_secs(60)).unwrap();
    let health = || {
        let out = p.run_cmd(&["health"]).unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, text) = health();
    assert!(ok, "{text}");
    assert!(p.run_cmd(&["status"]).unwrap().status.success(), "status exits 0 when ready");
    w.account().front.configure(|c| c.faults.latency = Duration::from_secs(25));
    // Two Adds take the warm addresses: the reconciler grows, and its EC2 call waits 25 s, past
    // the bound (10 s).
    added(add(&p, "h1"));
    added(add(&p, "h2"));
    eventually(Duration::from_secs(40), "liveness to fail", || !health().0);
    let (_, text) = health();
    assert!(text.contains("has not finished a step"), "{text}");
    w.account().front.configure(|c| c.faults.latency = Duration::ZERO);
    eventually(Duration::from_secs(60), "liveness to recover", || health().0);
}

/// Issue 14, item 3: drift with EC2 after start. (a) An Unassign whose replies were lost after EC2
/// acted: before, the release was aborted and the addresses offered again though EC2 no longer
/// had them (and every later release picked them again). Now EC2 is asked, and what it released
/// is gone. (b) An address removed behind ipamd's back is dropped by the periodic re-check, and
/// the pool grows back to its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pool_follows_ec2_after_lost_unassign_replies_and_outside_changes() {
    let (w, n) = world("m5.large").await;
    let p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 2\n[eni]\nrecheck_interval_ms = 2000\n"));
    p.wait_ready(2, Duration::from_secs(60)).unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("drift{i}")).collect();
    for name in &names {
        added(add(&p, name));
    }
    eventually(Duration::from_secs(30), "the pool grown for 5 + 2", || status(&p).free == 2);
    let front = &w.account().front;
    // Every Unassign reply is lost after EC2 acted; ipamd's retry then asks EC2 to unassign what
    // it no longer has, which AWS refuses (provoked here, by the lost replies).
    front.provoke(underway_tests::front::Rule::AddressNotAssigned);
    front.configure(|c| {
        c.faults.reset_after = 1.0;
        c.faults.actions = vec!["UnassignPrivateIpAddresses".into()];
    });
    for name in &names {
        assert_eq!(p.call(&Request::Del(key(name))).unwrap(), Response::Released { found: true });
    }
    eventually(Duration::from_secs(60), "ipamd to ask EC2 what it released", || {
        p.http_get(61781, "/v1/errors").unwrap().contains("yet EC2 released")
    });
    front.configure(|c| c.faults = Default::default());
    eventually(Duration::from_secs(30), "the pool agrees with EC2", || {
        let s = status(&p);
        s.free == 2 && s.assigned == 0
    });
    let in_ec2 = enis_in_ec2(&w, &n).await.iter().map(|e| e.2.len()).sum::<usize>();
    assert_eq!(in_ec2, 2, "{}", p.http_get(61781, "/v1/enis").unwrap());

    // (b) Someone unassigns a free address behind ipamd's back.
    let enis = enis_in_ec2(&w, &n).await;
    let (eni, _, ips) = enis.iter().find(|e| !e.2.is_empty()).unwrap().clone();
    w.ec2()
        .client
        .unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(ips[0].to_string())
        .send()
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the re-check repaired the pool", || {
        p.http_get(61781, "/v1/errors").unwrap().contains("re-check against EC2 repaired")
    });
    eventually(Duration::from_secs(30), "back to the target", || status(&p).free == 2);
    let held = enis_in_ec2(&w, &n).await.iter().map(|e| e.2.len()).sum::<usize>();
    assert_eq!(held, 2, "EC2 and the pool agree: {}", p.http_get(61781, "/v1/enis").unwrap());
}

/// Issue 14, item 7: an attached ENI whose link never appears on the node (here: the world does
/// not sync, so no link and no IMDS entry ever comes) is given up after `pending_give_up_ms`:
/// detached and deleted, and recorded; the node keeps serving from its other ENIs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eni_whose_link_never_appears_is_given_up() {
    let w = underway_tests::world::World::create().await.unwrap();
    let n = w.add_node("m5.large").await.unwrap();
    w.sync().await.unwrap(); // the primary ENI once; nothing later
    let p = start(
        &w,
        &n,
        &format!("{FAST}[targets]\nwarm_ip_target = 12\n[eni]\nlink_wait_ms = 1000\npending_give_up_ms = 4000\n"),
    );
    let t = std::time::Instant::now();
    let errors = loop {
        let e = p.http_get(61781, "/v1/errors").unwrap_or_default();
        if e.contains("gave up on") {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never gave up: {e}\n{}", p.log_text());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(errors.contains("its link did not appear within 4000 ms"), "{errors}");
    assert!(errors.contains("detached and deleted"), "{errors}");
    let given_up = errors.split("gave up on ").nth(1).unwrap().split(':').next().unwrap().to_string();
    let records = w.account().front.records();
    let ok = |action: &str| {
        records.iter().any(|r| r.action == action && r.outcome == underway_tests::front::Outcome::Forwarded(200))
    };
    assert!(ok("DetachNetworkInterface") && ok("DeleteNetworkInterface"), "{records:?}");
    let ec2 = aws_sdk_ec2::Client::new(&w.account().direct_sdk_config());
    let left = ec2.describe_network_interfaces().network_interface_ids(&given_up).send().await;
    let still = left.ok().map(|o| o.network_interfaces().len()).unwrap_or(0);
    assert_eq!(still, 0, "{given_up} is deleted from EC2");
    // Meanwhile the primary ENI's addresses served.
    assert!(matches!(add(&p, "still-serving"), Response::Added(_)));
    assert!(w.account().front.unprovoked().is_empty(), "{:?}", w.account().front.unprovoked());
}

/// Found by the fault test: every AttachNetworkInterface acts in EC2 but its reply is lost. The
/// cloud layer retried it, and AWS refuses a second attach of the ENI (its device index is in
/// use). An attach whose fate is unknown is not repeated: ipamd reads EC2 and adopts the ENI.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attach_whose_reply_was_lost_is_not_repeated_but_adopted() {
    let (w, n) = world("m5.large").await;
    w.account().front.configure(|c| {
        c.faults.reset_after = 1.0;
        c.faults.actions = vec!["AttachNetworkInterface".into()];
    });
    let p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 12\n"));
    p.wait_ready(12, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
    let records = w.account().front.records();
    let attaches = records.iter().filter(|r| r.action == "AttachNetworkInterface").count();
    assert_eq!(attaches, 1, "one attach, not one per retry");
    assert!(w.account().front.unprovoked().is_empty(), "{:?}", w.account().front.unprovoked());
    let errors = p.http_get(61781, "/v1/errors").unwrap();
    assert!(errors.contains("adopted"), "{errors}");
    assert_eq!(enis_in_ec2(&w, &n).await.len(), 2);
    // The attach's second step (delete on termination) never ran for it, the reply being lost
    // before it: done on adoption, or the ENI would outlive its instance. (LocalStack ignores the
    // attribute, so the front's record of the call is what can be checked.)
    let modifies = records.iter().filter(|r| r.action == "ModifyNetworkInterfaceAttribute").count();
    assert_eq!(modifies, 1, "delete on termination set for the adopted ENI");
}

/// Issue 17: an instance with several network cards (c6in.32xlarge: 16 interfaces as two cards of
/// 8, as DescribeInstanceTypes says). ipamd attaches on card 0, so card 0's 8 is its limit (it
/// took 16, and planned ENIs card 0 refuses; the strict front refuses them past 8 too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_type_with_several_network_cards_is_bound_by_card_0() {
    let (w, n) = world("c6in.32xlarge").await;
    let p = start(&w, &n, FAST);
    p.wait_ready(1, Duration::from_secs(60)).unwrap();
    let m = p.http_get(61780, "/metrics").unwrap();
    assert_eq!(sample(&m, "underway_enis_limit"), Some(8.0), "{m}");
}

/// Found by the fault test in tests/run: an AssignPrivateIpAddresses whose reply was lost after
/// EC2 acted was repeated by the cloud layer; a count is not idempotent, so the ENI got the
/// addresses twice, and past the type's limit AWS refused the repeat. An assign whose fate is
/// unknown is not repeated: ipamd reads the ENI and learns what EC2 gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_assign_whose_reply_was_lost_is_not_repeated_but_learned() {
    let (w, n) = world("m5.large").await;
    w.account().front.configure(|c| {
        c.faults.reset_after = 1.0;
        c.faults.actions = vec!["AssignPrivateIpAddresses".into()];
    });
    let p = start(&w, &n, &format!("{FAST}[targets]\nwarm_ip_target = 5\n"));
    p.wait_ready(5, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", p.log_text()));
    let records = w.account().front.records();
    let assigns = records.iter().filter(|r| r.action == "AssignPrivateIpAddresses").count();
    assert_eq!(assigns, 1, "one assign, not one per retry");
    assert!(w.account().front.unprovoked().is_empty(), "{:?}", w.account().front.unprovoked());
    let enis = enis_in_ec2(&w, &n).await;
    assert_eq!(enis[0].2.len(), 5, "EC2 gave 5 once: {enis:?}");
    let errors = p.http_get(61781, "/v1/errors").unwrap();
    assert!(errors.contains("reply was lost"), "{errors}");
}
