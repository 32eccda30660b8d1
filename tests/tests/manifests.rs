//! The Kubernetes manifests in deploy/k8s are valid for a pinned Kubernetes version, checked
//! offline with PyPI's kubernetes-validate (installed into the test venv when missing), strictly
//! (an unknown field is an error). The same checker refuses a broken copy, so it is not a no-op.

use std::path::{Path, PathBuf};
use std::process::Command;

use underway_tests::localstack::{ensure_installed, venv};

const KUBERNETES: &str = "1.30.0";
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

fn validator() -> PathBuf {
    let venv = venv();
    ensure_installed(&venv).unwrap();
    let bin = venv.join("bin/kubernetes-validate");
    if !bin.exists() {
        let st = Command::new(venv.join("bin/pip")).args(["install", "-q", VALIDATOR]).status().unwrap();
        assert!(st.success(), "pip install {VALIDATOR}");
    }
    bin
}

fn validate(bin: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(bin).args(["-k", KUBERNETES, "--strict"]).args(files).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_manifest_validates_strictly() {
    let bin = validator();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    let (ok, text) = validate(&bin, &files);
    assert!(ok, "{text}");
    for kind in [
        "daemonset/underway",
        "clusterrole/underway",
        "serviceaccount/underway",
        "customresourcedefinition/underwaypools.underway.dev",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} checked: {text}");
    }
    // A misspelt field must fail: the check is real.
    let bad = std::env::temp_dir().join(format!("underway-bad-{}.yaml", std::process::id()));
    let ds = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    std::fs::write(&bad, ds.replace("hostNetwork: true", "hostNetwrk: true")).unwrap();
    let (ok, text) = validate(&bin, std::slice::from_ref(&bad));
    let _ = std::fs::remove_file(&bad);
    assert!(!ok && text.contains("hostNetwrk"), "{text}");
}

/// The kustomize overlays as users install them: `kubectl kustomize` renders each over the base,
/// the rendering validates strictly, and it holds one hashed ConfigMap with the conflist and the
/// overlay's ipamd.toml (of its mode) that the DaemonSet mounts.
#[test]
fn each_overlay_renders_and_validates() {
    let bin = validator();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for (overlay, mode_line) in [("eni", None), ("vpc-route", Some("mode = \"vpc-route\""))] {
        let out = Command::new("kubectl").arg("kustomize").arg(root.join("overlays").join(overlay)).output().unwrap();
        assert!(out.status.success(), "{overlay}: {}", String::from_utf8_lossy(&out.stderr));
        let rendered = String::from_utf8_lossy(&out.stdout).to_string();
        let file = std::env::temp_dir().join(format!("underway-{overlay}-{}.yaml", std::process::id()));
        std::fs::write(&file, &rendered).unwrap();
        let (ok, text) = validate(&bin, std::slice::from_ref(&file));
        let _ = std::fs::remove_file(&file);
        assert!(ok, "{overlay}: {text}");
        for kind in
            ["daemonset/underway", "clusterrole/underway", "customresourcedefinition/underwaypools.underway.dev"]
        {
            assert!(text.contains(&format!("passed for resource {kind}")), "{overlay}: {kind} checked: {text}");
        }
        // One ConfigMap, name with the content hash, mounted by the DaemonSet under that name.
        let name = rendered
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("name: underway-"))
            .find(|rest| rest.len() == 10 && rest.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| panic!("{overlay}: no hashed ConfigMap in\n{rendered}"));
        assert_eq!(rendered.matches(&format!("name: underway-{name}")).count(), 2, "{overlay}: made and mounted");
        assert!(rendered.contains("10-underway.conflist: |") && rendered.contains("ipamd.toml: |"), "{overlay}");
        match mode_line {
            Some(m) => assert!(rendered.contains(m), "{overlay}: {m}"),
            None => assert!(!rendered.contains("mode = \"vpc-route\""), "{overlay}: ENI mode (the default)"),
        }
    }
}
