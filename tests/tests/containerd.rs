//! A real runtime: containerd (Debian's, with runc) started by the test inside a test-world node,
//! its state in a temp dir, configured with underway's conflist, driven over CRI
//! (RunPodSandbox, StopPodSandbox, RemovePodSandbox) with a pause image built here (a static
//! binary in a hand-made OCI archive; no registry). Needs root, containerd, runc, gcc with a
//! static libc, and the workspace's binaries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StopPodSandboxRequest,
};
use serde_json::{Value, json};
use underway_api::{AttachmentKey, Request, Response};
use underway_tests::cni::{cni, conf};
use underway_tests::ipamd::{IpamdProcess, bin_path};
use underway_tests::netns::TempNs;
use underway_tests::world::World;

const IMAGE: &str = "underway.local/pause:1";

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> (String, u64) {
    let d = sh(&format!("sha256sum {}", path.display()));
    (d.split_whitespace().next().unwrap().to_string(), std::fs::metadata(path).unwrap().len())
}

/// Writes a blob into the layout and returns its descriptor fields.
fn blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let tmp = layout.join("blob.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    let (d, n) = sha256(&tmp);
    std::fs::rename(&tmp, layout.join("blobs/sha256").join(&d)).unwrap();
    (d, n)
}

/// A pause image as an OCI archive: one layer holding a static `/pause`.
fn pause_image(dir: &Path) -> PathBuf {
    let src = dir.join("pause.c");
    std::fs::write(&src, "#include <unistd.h>\nint main(void){for(;;)pause();}\n").unwrap();
    let root = dir.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    sh(&format!("gcc -static -O2 -o {}/pause {}", root.display(), src.display()));
    let layout = dir.join("oci");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer = dir.join("layer.tar");
    sh(&format!("tar --owner=0 --group=0 -C {} -cf {} pause", root.display(), layer.display()));
    let (ld, ln) = sha256(&layer);
    std::fs::rename(&layer, layout.join("blobs/sha256").join(&ld)).unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{ld}")]}
    });
    let (cd, cn) = blob(&layout, config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{cd}"), "size": cn},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{ld}"), "size": ln}]
    });
    let (md, mn) = blob(&layout, manifest.to_string().as_bytes());
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{md}"), "size": mn,
        "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1"}
    }]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let archive = dir.join("pause.tar");
    sh(&format!("tar -C {} -cf {} oci-layout index.json blobs", layout.display(), archive.display()));
    archive
}

/// The sandbox namespaces containerd makes (`/var/run/netns/cni-<uuid>`).
fn cni_netns() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("cni-")).collect())
        .unwrap_or_default()
}

/// A containerd and everything it made; all removed on drop, also when the test fails.
struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
    netns_before: std::collections::BTreeSet<String>,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims outlive containerd by design; ours are found by the directory they use.
        let _ = Command::new("pkill").args(["-9", "-f", &self.dir.display().to_string()]).status();
        for ns in cni_netns().difference(&self.netns_before) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umount -R {}/state 2>/dev/null; umount -R {}/root 2>/dev/null",
                self.dir.display(),
                self.dir.display()
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// containerd inside `ns`, everything under `dir`, CNI from `bin_dir` and `conf_dir`.
fn containerd(ns: &str, dir: &Path, bin_dir: &Path, conf_dir: &Path) -> Containerd {
    let socket = dir.join("containerd.sock");
    let netns_before = cni_netns();
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = socket.display(),
        bin = bin_dir.display(),
        conf = conf_dir.display(),
    );
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    // nsenter, not `ip netns exec`: that also makes a mount namespace with a fresh /sys, which
    // hides the cgroup mounts runc needs.
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["containerd", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let ctd = Containerd { child, socket, dir: dir.to_path_buf(), netns_before };
    let t = Instant::now();
    while !ctd.socket.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "containerd did not start: {}", log_of(dir));
        std::thread::sleep(Duration::from_millis(100));
    }
    ctd
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
}

async fn cri(socket: &Path) -> RuntimeServiceClient<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    RuntimeServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_runs_a_sandbox_on_underway_and_releases_it() {
    let dir = std::env::temp_dir().join(format!("underway-containerd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let archive = pause_image(&dir);

    let w = World::create().await.unwrap();
    let a = w.add_node("m5.large").await.unwrap();
    let b = w.add_node("m5.large").await.unwrap();
    w.start_sync_loop(Duration::from_millis(200));
    let ipamd = bin_path("underway-ipamd").unwrap();
    let da = IpamdProcess::start(&w, &a, &ipamd, "cooldown_ms = 1000\n[targets]\nwarm_ip_target = 2\n").unwrap();
    let db = IpamdProcess::start(
        &w,
        &b,
        &ipamd,
        "cooldown_ms = 1000\nmode = \"vpc-route\"\n[vpc_route]\npod_cidr = \"100.64.50.0/24\"\ncluster_cidr = \"100.64.0.0/16\"\n",
    )
    .unwrap();
    da.wait_ready(2, Duration::from_secs(60)).unwrap();
    db.wait_ready(254, Duration::from_secs(60)).unwrap();

    // The node's CNI set-up as deploy/ describes it: underway → portmap.
    let bins = dir.join("cni-bin");
    let confs = dir.join("net.d");
    std::fs::create_dir_all(&bins).unwrap();
    std::fs::create_dir_all(&confs).unwrap();
    std::os::unix::fs::symlink(bin_path("underway").unwrap(), bins.join("underway")).unwrap();
    // containerd's CRI also sets up the sandbox's lo with the reference `loopback` plugin.
    for p in ["portmap", "loopback"] {
        std::os::unix::fs::symlink(format!("/usr/lib/cni/{p}"), bins.join(p)).unwrap();
    }
    let mut list: Value =
        serde_json::from_str(&std::fs::read_to_string("../deploy/k8s/10-underway.conflist").unwrap()).unwrap();
    list["plugins"][0]["ipamdSocket"] = json!(da.socket);
    list["plugins"][0]["logFile"] = json!(dir.join("cni.log"));
    std::fs::write(confs.join("10-underway.conflist"), list.to_string()).unwrap();

    let ctd = containerd(&a.ns, &dir, &bins, &confs);
    let out = Command::new("ctr")
        .args(["-a", &ctd.socket.display().to_string(), "-n", "k8s.io", "images", "import"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));

    let mut rt = cri(&ctd.socket).await;
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: format!("uid-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web".into(),
        log_directory: dir.join("pods").display().to_string(),
        ..Default::default()
    };
    let run = rt.run_pod_sandbox(RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() }).await;
    let id = match run {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!(
            "RunPodSandbox: {e}\ncontainerd:\n{}\ncni log:\n{}",
            log_of(&dir),
            std::fs::read_to_string(dir.join("cni.log")).unwrap_or_default()
        ),
    };
    let st = rt
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner();
    let ip: std::net::Ipv4Addr = st.status.unwrap().network.unwrap().ip.parse().unwrap();
    let key = AttachmentKey { network: "underway".into(), container_id: id.clone(), ifname: "eth0".into() };
    match da.call(&Request::Check(key.clone())).unwrap() {
        Response::Checked(c) => assert_eq!(c.address, ip, "the sandbox has ipamd's address"),
        other => panic!("{other:?}"),
    }
    let held: Value = serde_json::from_str(&da.http_get(61781, "/v1/assignments").unwrap()).unwrap();
    assert_eq!(held[0]["name"], "web", "the runtime's CNI_ARGS named the pod: {held}");

    // Reachable from a pod on another node.
    let far = TempNs::new("far").unwrap();
    let (code, v) = cni(&b.ns, "ADD", "far", &far.path().display().to_string(), &conf(&db));
    assert_eq!(code, 0, "{v}");
    assert!((0..4).any(|_| far.sh(&format!("ping -c 1 -W 1 {ip}")).0), "the sandbox from node B's pod");

    // Stop: DEL with the netns; Remove: a second DEL with an empty CNI_NETNS. Both succeed.
    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await.unwrap();
    assert!(matches!(da.call(&Request::Check(key.clone())).unwrap(), Response::Error(_)), "released on stop");
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.clone() }).await.unwrap();
    let cni_log = std::fs::read_to_string(dir.join("cni.log")).unwrap_or_default();
    let dels: Vec<&str> = cni_log.lines().filter(|l| l.contains(&id) && l.contains("DEL ok")).collect();
    assert_eq!(dels.len(), 2, "Stop's DEL and Remove's DEL both succeeded:\n{cni_log}");
    assert!(dels[1].contains("(netns -)"), "the second DEL comes with an empty CNI_NETNS:\n{cni_log}");
    let veths = a.exec(&["sh", "-c", "ip -br link | grep -c '^uw' || true"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&veths.stdout).trim(), "0", "no veth left");
    drop(rt);
    drop(ctd);
    assert!(!dir.exists(), "the runtime's directory is gone");
}
