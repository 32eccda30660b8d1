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
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
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
