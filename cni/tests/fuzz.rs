//! Property tests (proptest) over the CNI binary's two parsers, the environment and the network
//! config, in the order `run` applies them: whatever a runtime sends, no panic, and every
//! rejection is one of the spec's codes with a message naming the variable or field at fault.
//! `UNDERWAY_FUZZ_CASES` sets the case count (tests/run: the default 256; tests/torture: many more).

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use underway_cni::config;
use underway_cni::env::{self, Command};
use underway_cni::error::{CniError, code};

const VARS: &[&str] = &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];
const FIELDS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "ipamdSocket",
    "mtu",
    "vethPrefix",
    "logFile",
    "logLevel",
    "ipamdTimeoutSeconds",
    "runtimeConfig",
    "prevResult",
    "cni.dev/valid-attachments",
];

fn cases() -> u32 {
    std::env::var("UNDERWAY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// Strings a runtime (or an attacker) might send: near-valid ones, odd characters, long ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9_.-]{1,20}",
        "/[a-z/]{0,30}",
        "[A-Z_]{1,12}=[^;]{0,12}(;[A-Z_]{1,12}=[^;]{0,12}){0,3}",
        any::<String>(),
        "\\PC{0,300}",
    ]
}

fn value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        (0u64..70000).prop_map(|n| json!(n)),
        prop::sample::select(config::SUPPORTED.to_vec()).prop_map(|v| json!(v)),
        Just(json!("underway")),
        text().prop_map(Value::String),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        4 => leaf,
        1 => prop::collection::vec(value(depth - 1), 0..4).prop_map(Value::Array),
        1 => prop::collection::btree_map(text(), value(depth - 1), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
    .boxed()
}

/// A config object: mostly the plugin's own fields (so the checks past the first are reached).
fn conf_object() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![4 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_string), 1 => text()];
    (prop::collection::btree_map(field, value(2), 0..10), any::<bool>()).prop_map(|(m, valid_base)| {
        let mut o: Map<String, Value> = Map::new();
        if valid_base {
            o.insert("cniVersion".into(), json!("1.1.0"));
            o.insert("name".into(), json!("underway"));
            o.insert("type".into(), json!("underway"));
        }
        o.extend(m);
        serde_json::to_vec(&Value::Object(o)).unwrap()
    })
}

fn stdin() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => conf_object(),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => value(2).prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

fn environment() -> impl Strategy<Value = Vec<(String, String)>> {
    let command = prop_oneof![
        prop::sample::select(vec!["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"]).prop_map(str::to_string),
        text(),
    ];
    (command, prop::collection::vec((prop::sample::select(VARS.to_vec()), text()), 0..8), any::<bool>()).prop_map(
        |(cmd, vars, with_cmd)| {
            let mut out: Vec<(String, String)> = vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if with_cmd {
                out.push(("CNI_COMMAND".into(), cmd));
            }
            out
        },
    )
}

fn names_a_variable(e: &CniError) -> bool {
    e.code == code::INVALID_ENV && VARS.iter().any(|v| e.msg == format!("invalid environment variable {v}"))
}

fn names_a_field(e: &CniError) -> bool {
    match e.code {
        code::DECODE => e.msg == "cannot decode the network config on stdin",
        code::INCOMPATIBLE_VERSION => e.msg.contains("cniVersion"),
        // A missing or mistyped field, or a bad value: the field is named.
        code::INVALID_CONFIG => FIELDS.iter().any(|f| e.msg == format!("invalid network config field {f}")),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_environment_is_accepted_or_refused_by_name(vars in environment()) {
        let get = |k: &str| vars.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if let Err(e) = env::parse(get) {
            prop_assert!(names_a_variable(&e), "{e:?}");
            // The error JSON a runtime reads is well-formed and carries the code.
            let j: Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
            prop_assert_eq!(j["code"].as_u64(), Some(u64::from(e.code)));
        }
    }

    #[test]
    fn the_network_config_is_accepted_or_refused_by_field(bytes in stdin(), cmd in 0usize..6) {
        let command = [Command::Add, Command::Del, Command::Check, Command::Version, Command::Status, Command::Gc][cmd];
        match config::parse(&bytes, command) {
            Err(e) => prop_assert!(names_a_field(&e), "{e:?} for {}", String::from_utf8_lossy(&bytes)),
            Ok(c) => {
                // What was accepted holds what the rest of the plugin relies on.
                prop_assert!(config::version_rank(&c.cni_version).is_some());
                prop_assert!(c.ipamd_socket.is_absolute());
                prop_assert!(!c.veth_prefix.is_empty() && c.veth_prefix.len() <= 4);
                prop_assert!(c.log_file.as_ref().is_none_or(|p| p.is_absolute()));
            }
        }
    }
}
