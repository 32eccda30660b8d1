//! Issue 16: the container image, built here (`deploy/image/build`, buildah, from nothing) and run
//! with podman the way `deploy/k8s/daemonset.yaml` runs it — read from the manifest, not restated:
//! its image name, init container and ipamd container (command, env, securityContext, volume
//! mounts), host network as a test-world node's namespace, hostPath volumes as directories of the
//! test (the node's `/var/run/netns` and `/proc/sys/net` as themselves), the ConfigMap as
//! deploy/overlays/eni/ipamd.toml and deploy/k8s/10-underway.conflist. Then: the init step installs
//! the CNI binary and turns forwarding on; ipamd serves and installs the conflist (the node would
//! turn Ready); the liveness probe passes; ipamd's nftables table and the primary ENI's loose
//! rp_filter are in place (nft in the image, sysctls through the mounted /proc/sys/net with
//! NET_ADMIN only); a pod added through the *installed* binary and conflist pings a pod on another
//! node. Deviations, each forced by this machine: no API server (`UNDERWAY_KUBERNETES__ENABLED`
//! is overridden to false), the world's IMDS/EC2 endpoints and credentials are added to the env,
//! podman's default rlimits exceed this machine's hard limits (lowered), and the paths of the
//! node's directories are the test's (rewritten in the conflist the test runs). Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use underway_tests::cni::{address, chain, cni, conf};
use underway_tests::ipamd::{IpamdProcess, bin_path};
use underway_tests::localstack::{ensure_installed, venv};
use underway_tests::netns::TempNs;
use underway_tests::world::World;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// deploy/k8s/daemonset.yaml as JSON (PyYAML from the LocalStack venv).
fn daemonset() -> Value {
    let venv = venv();
    ensure_installed(&venv).unwrap();
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(format!("{REPO}/deploy/k8s/daemonset.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn podman(args: &[String]) -> std::process::Output {
    Command::new("podman").args(args).output().expect("podman (deploy/local/prereqs installs it)")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A directory of the test's, removed however the test ends.
struct Gone(PathBuf);
impl Drop for Gone {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The container is removed however the test ends.
struct Container(String);
impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", "-t", "0", &self.0]).output();
    }
}

/// podman flags for one container of the pod spec: its securityContext, its volume mounts (a
/// hostPath from `host_path`, the ConfigMap from `config_dir`) and its env (`node` for
/// spec.nodeName), then `extra_env`.
fn container_flags(
    c: &Value,
    volumes: &Value,
    host_path: &dyn Fn(&str) -> PathBuf,
    config_dir: &Path,
    node: &str,
    extra_env: &[(&str, String)],
) -> Vec<String> {
    let mut f = Vec::new();
    let sc = &c["securityContext"];
    if sc["privileged"].as_bool() == Some(true) {
        f.push("--privileged".into());
    }
    for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
        f.push(format!("--cap-drop={}", cap.as_str().unwrap()));
    }
    for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
        f.push(format!("--cap-add={}", cap.as_str().unwrap()));
    }
    if sc["allowPrivilegeEscalation"].as_bool() == Some(false) {
        f.push("--security-opt=no-new-privileges".into());
    }
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap();
        let vol = volumes.as_array().unwrap().iter().find(|v| v["name"] == name).unwrap();
        let src = match vol["hostPath"]["path"].as_str() {
            Some(p) => host_path(p),
            None => {
                assert!(vol["configMap"].is_object(), "volume {name}: only hostPath and configMap are played");
                config_dir.to_path_buf()
            }
        };
        let mut opts = Vec::new();
        if m["readOnly"].as_bool() == Some(true) {
            opts.push("ro");
        }
        if m["mountPropagation"].as_str() == Some("HostToContainer") {
            opts.push("rslave");
        }
        let opts = if opts.is_empty() { String::new() } else { format!(":{}", opts.join(",")) };
        f.push(format!("--volume={}:{}{opts}", src.display(), m["mountPath"].as_str().unwrap()));
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let value = match (&e["value"], e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Value::String(v), _) => v.clone(),
            (_, Some("spec.nodeName")) => node.to_string(),
            other => panic!("env {}: {other:?} is not played", e["name"]),
        };
        f.push(format!("--env={}={value}", e["name"].as_str().unwrap()));
    }
    for (k, v) in extra_env {
        f.push(format!("--env={k}={v}"));
    }
    f
}

fn command(c: &Value) -> Vec<String> {
    c["command"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_image_runs_as_the_daemonset_runs_it() {
    let ds = daemonset();
    let spec = &ds["spec"]["template"]["spec"];
    let (init, ipamd) = (&spec["initContainers"][0], &spec["containers"][0]);
    let image = ipamd["image"].as_str().unwrap();
    assert_eq!(init["image"].as_str(), Some(image), "one image for both");
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    // This build's ipamd and the shipped CNI binary (`cargo build-cni`, static: the one the init
    // container installs on hosts), through the release image's check that it is static.
    let bins = std::env::temp_dir().join(format!("underway-image-bins-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bins);
    std::fs::create_dir_all(&bins).unwrap();
    let bins_gone = Gone(bins.clone());
    std::os::unix::fs::symlink(bin_path("underway-ipamd").unwrap(), bins.join("underway-ipamd")).unwrap();
    std::os::unix::fs::symlink(underway_tests::ipamd::shipped_cni_path().unwrap(), bins.join("underway")).unwrap();
    let built = Command::new(format!("{REPO}/deploy/image/build"))
        .arg(image)
        .env("UNDERWAY_IMAGE_BINS", &bins)
        .env("UNDERWAY_IMAGE_PROFILE", "release")
        .output()
        .unwrap();
    drop(bins_gone);
    assert!(built.status.success(), "deploy/image/build: {}", text(&built));

    let w = World::create().await.unwrap();
    let a = w.add_node("m5.large").await.unwrap();
    let b = w.add_node("m5.large").await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    let pb = IpamdProcess::start(&w, &b, &bin_path("underway-ipamd").unwrap(), "cooldown_ms = 1000\n").unwrap();

    // The node's directories, under the test's.
    let host = std::env::temp_dir().join(format!("underway-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&host);
    let host_path = |p: &str| -> PathBuf {
        match p {
            "/var/run/netns" | "/proc/sys/net" => PathBuf::from(p),
            other => {
                let d = host.join(other.trim_start_matches('/'));
                std::fs::create_dir_all(&d).unwrap();
                d
            }
        }
    };
    let config_dir = host.join("configmap");
    std::fs::create_dir_all(&config_dir).unwrap();
    let ipamd_toml = std::fs::read_to_string(format!("{REPO}/deploy/overlays/eni/ipamd.toml"))
        .unwrap()
        .replace("cluster = \"my-cluster\"", &format!("cluster = \"{}\"", w.id()));
    std::fs::write(config_dir.join("ipamd.toml"), ipamd_toml).unwrap();
    std::fs::copy(format!("{REPO}/deploy/k8s/10-underway.conflist"), config_dir.join("10-underway.conflist")).unwrap();
    let network = format!("--network=ns:/var/run/netns/{}", a.ns);
    let common = ["--ulimit=nofile=4096:4096".to_string(), "--ulimit=nproc=4096:4096".into(), network];

    // The init container: installs the CNI binary and turns forwarding on.
    assert!(a.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]).unwrap().status.success());
    let mut args: Vec<String> = vec!["run".into(), "--rm".into()];
    args.extend(common.iter().cloned());
    args.extend(container_flags(init, &spec["volumes"], &host_path, &config_dir, &a.instance_id, &[]));
    args.push(image.into());
    args.extend(command(init));
    let out = podman(&args);
    assert!(out.status.success(), "init container: {}", text(&out));
    let cni_bin = host_path("/opt/cni/bin");
    assert!(cni_bin.join("underway").is_file(), "the CNI binary installed");
    let fwd = a.exec(&["sysctl", "-n", "net.ipv4.ip_forward"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1", "forwarding on");

    // ipamd, as the DaemonSet's container, with the world's endpoints.
    let name = format!("uwt-ipamd-{}", std::process::id());
    let world_env = [
        ("AWS_ACCESS_KEY_ID", w.account().id.clone()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", a.imds_endpoint_in_ns()),
        ("UNDERWAY_CLOUD__ENDPOINT", a.ec2_endpoint_in_ns()),
        ("UNDERWAY_KUBERNETES__ENABLED", "false".into()),
        ("UNDERWAY_COOLDOWN_MS", "1000".into()),
    ];
    let mut args: Vec<String> = vec!["run".into(), "-d".into(), format!("--name={name}")];
    args.extend(common.iter().cloned());
    args.extend(container_flags(ipamd, &spec["volumes"], &host_path, &config_dir, &a.instance_id, &world_env));
    args.push(image.into());
    args.extend(command(ipamd));
    let out = podman(&args);
    let _container = Container(name.clone());
    assert!(out.status.success(), "ipamd container: {}", text(&out));
    let logs = || text(&podman(&["logs".into(), name.clone()]));
    let installed = host_path("/etc/cni/net.d").join("10-underway.conflist");
    let t = Instant::now();
    while !installed.exists() {
        assert!(t.elapsed() < Duration::from_secs(90), "the conflist was never installed:\n{}", logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let probe = &ipamd["livenessProbe"]["exec"]["command"];
    let mut args: Vec<String> = vec!["exec".into(), name.clone()];
    args.extend(probe.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()));
    let out = podman(&args);
    assert!(out.status.success(), "the liveness probe: {}\n{}", text(&out), logs());
    let t = Instant::now();
    loop {
        let table = a.exec(&["nft", "list", "table", "ip", "underway"]).unwrap();
        let rp = a.exec(&["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"]).unwrap();
        if table.status.success() && String::from_utf8_lossy(&rp.stdout).trim() == "2" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no egress table or strict eth0:\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }

    // A pod through the installed binary and conflist (the node's paths are the test's).
    let mut conflist: Value = serde_json::from_str(&std::fs::read_to_string(&installed).unwrap()).unwrap();
    conflist["plugins"][0]["ipamdSocket"] =
        Value::String(host_path("/run/underway").join("ipamd.sock").display().to_string());
    conflist["plugins"][0]["logFile"] = Value::String(host.join("cni.log").display().to_string());
    let pod_a = TempNs::new("img").unwrap();
    let netns_a = pod_a.path().display().to_string();
    let runtime = serde_json::json!({});
    let r = chain(Some(&cni_bin), &a.ns, "ADD", "imgpod", &netns_a, &conflist, &runtime, None)
        .unwrap_or_else(|e| panic!("ADD through the installed plugin: {e:?}\n{}", logs()));
    let pod_b = TempNs::new("img").unwrap();
    pb.wait_ready(1, Duration::from_secs(60)).unwrap();
    let (code, vb) = cni(&b.ns, "ADD", "farpod", &pod_b.path().display().to_string(), &conf(&pb));
    assert_eq!(code, 0, "{vb}");
    let ping = |ns: &str, to: std::net::Ipv4Addr| {
        (0..4).any(|_| {
            underway_tests::netns::exec(ns, &["ping", "-c", "1", "-W", "1", &to.to_string()])
                .is_ok_and(|o| o.status.success())
        })
    };
    assert!(ping(&pod_a.0, address(&vb)), "the image's pod reaches a pod on another node");
    assert!(ping(&pod_b.0, address(&r)), "and back");
    chain(Some(&cni_bin), &a.ns, "DEL", "imgpod", &netns_a, &conflist, &runtime, Some(&r))
        .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    drop(_container);
    let _ = std::fs::remove_dir_all(&host);
}

/// The CNI binary runs on the host, not in the image, so it cannot lean on the C library it was
/// built against: a glibc 2.36 build asks for GLIBC_2.34 symbols, which Amazon Linux 2 (glibc
/// 2.26) or Ubuntu 20.04 (2.31) do not have, and every pod ADD would fail there. The shipped
/// build (`cargo build-cni`) is run alone in an empty root (no loader, no /lib): it answers
/// VERSION, and an ADD without CNI_NETNS gets the spec's error JSON naming the variable.
#[test]
fn the_shipped_cni_binary_needs_no_c_library() {
    let bin = underway_tests::ipamd::shipped_cni_path().unwrap();
    let root = std::env::temp_dir().join(format!("underway-empty-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let _gone = Gone(root.clone());
    std::fs::copy(&bin, root.join("underway")).unwrap();
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1, "the root holds the binary only");
    let run = |env: &[(&str, &str)], stdin: &str| {
        use std::io::Write;
        let mut child = Command::new("/usr/sbin/chroot")
            .arg(&root)
            .arg("/underway")
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("/usr/sbin/chroot (coreutils; root)");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let version = run(&[("CNI_COMMAND", "VERSION")], "");
    assert!(version.status.success(), "{} alone in an empty root: {}", bin.display(), text(&version));
    let v: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(v["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.0.0"), "{v}");
    let conf = r#"{"cniVersion": "1.0.0", "name": "underway", "type": "underway"}"#;
    let add =
        run(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/")], conf);
    assert!(!add.status.success(), "{}", text(&add));
    let e: Value = serde_json::from_slice(&add.stdout).unwrap_or_else(|_| panic!("error JSON: {}", text(&add)));
    assert_eq!(e["code"], 4, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");
}
