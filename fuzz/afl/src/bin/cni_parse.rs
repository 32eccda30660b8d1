//! Input: environment lines `NAME=value` up to the first NUL byte, then the network config.
//! Crashes (panics) when the parsers panic or refuse without a spec code naming the culprit.

use underway_cni::config;
use underway_cni::env::{self, Command};
use underway_cni::error::code;

const VARS: &[&str] = &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
        let (env_part, conf) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
        let text = String::from_utf8_lossy(env_part);
        let vars: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let get = |k: &str| vars.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let command = match env::parse(get) {
            Ok(e) => e.command,
            Err(e) => {
                assert_eq!(e.code, code::INVALID_ENV, "{e:?}");
                assert!(VARS.iter().any(|v| e.msg == format!("invalid environment variable {v}")), "{e:?}");
                Command::Add
            }
        };
        if let Err(e) = config::parse(conf, command) {
            assert!(matches!(e.code, code::DECODE | code::INCOMPATIBLE_VERSION | code::INVALID_CONFIG), "{e:?}");
            assert!(e.code != code::INVALID_CONFIG || e.msg.starts_with("invalid network config field "), "{e:?}");
            let j: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).expect("error JSON");
            assert_eq!(j["code"].as_u64(), Some(u64::from(e.code)));
        }
    });
}
