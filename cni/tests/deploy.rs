//! The conflist shipped in deploy/ is one the plugin accepts, and it chains into portmap.

use serde_json::Value;
use underway_cni::config;
use underway_cni::env::Command;

#[test]
fn the_shipped_conflist_is_valid_for_every_command() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cni/10-underway.conflist")).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins[0]["type"], "underway", "underway comes first");
    assert!(plugins.iter().any(|p| p["type"] == "portmap"));
    // The runtime hands each plugin its entry with the list's name and cniVersion added.
    let mut entry = plugins[0].clone();
    entry["name"] = list["name"].clone();
    entry["cniVersion"] = list["cniVersion"].clone();
    for cmd in [Command::Add, Command::Del, Command::Check, Command::Status, Command::Gc] {
        let c = config::parse(entry.to_string().as_bytes(), cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert_eq!(c.mtu, Some(9001));
        assert_eq!(c.ipamd_socket, std::path::PathBuf::from(underway_api::DEFAULT_SOCKET));
    }
}
