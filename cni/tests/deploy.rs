//! The conflist shipped in deploy/ is one the plugin accepts, and it chains into portmap.

use serde_json::Value;
use underway_cni::config;
use underway_cni::env::Command;

#[test]
fn the_shipped_conflist_is_valid_for_every_command() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s/10-underway.conflist")).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins[0]["type"], "underway", "underway comes first");
    assert!(plugins.iter().any(|p| p["type"] == "portmap"));
    // The runtime hands each plugin its entry with the list's name and cniVersion added.
    let mut entry = plugins[0].clone();
    entry["name"] = list["name"].clone();
    entry["cniVersion"] = list["cniVersion"].clone();
    for cmd in [Command::Add, Command::Del, Command::Check] {
        let c = config::parse(entry.to_string().as_bytes(), cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert_eq!(c.mtu, Some(9001));
        assert_eq!(c.ipamd_socket, std::path::PathBuf::from(underway_api::DEFAULT_SOCKET));
    }
    // 1.0.0, not 1.1.0: containerd 1.6/1.7 (libcni 1.1) refuse a 1.1.0 result ("unsupported CNI
    // result version", seen by tests/tests/containerd.rs), and Debian's portmap 1.1.1 stops at 1.0.0.
    // STATUS and GC are 1.1 verbs: a runtime only sends them for a 1.1.0 list.
    assert_eq!(list["cniVersion"], "1.0.0");
    entry["cniVersion"] = "1.1.0".into();
    for cmd in [Command::Status, Command::Gc] {
        config::parse(entry.to_string().as_bytes(), cmd).unwrap_or_else(|e| panic!("{cmd:?} with 1.1.0: {e}"));
    }
}
