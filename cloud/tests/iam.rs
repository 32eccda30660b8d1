//! The IAM policy in deploy/ grants exactly the EC2 actions the cloud seam calls: a call added
//! to `aws.rs` without its permission (or a permission left after its call is gone) fails here.

use std::collections::BTreeSet;

fn policy_actions() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/iam-policy.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("the policy is JSON");
    assert_eq!(v["Version"], "2012-10-17");
    let mut out = BTreeSet::new();
    for s in v["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow", "{s}");
        match &s["Action"] {
            serde_json::Value::String(a) => {
                out.insert(a.clone());
            }
            serde_json::Value::Array(a) => out.extend(a.iter().map(|x| x.as_str().unwrap().to_string())),
            other => panic!("Action {other}"),
        }
    }
    out
}

/// Operation names `aws.rs` passes to its call wrapper (`self.call("Op", …)`, `const OP`, `refuse("Op", …)`).
fn seam_operations() -> BTreeSet<String> {
    let src = include_str!("../src/aws.rs");
    let mut out = BTreeSet::new();
    for marker in ["const OP: &str = \"", "self.call(\"", "refuse(\""] {
        for part in src.split(marker).skip(1) {
            let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                out.insert(format!("ec2:{name}"));
            }
        }
    }
    out
}

#[test]
fn the_policy_grants_what_the_seam_calls_and_nothing_else() {
    let mut want = seam_operations();
    assert!(want.len() >= 15, "the scan found the seam's operations: {want:?}");
    // Tags are set inside CreateNetworkInterface (TagSpecifications), which needs CreateTags.
    want.insert("ec2:CreateTags".into());
    let have = policy_actions();
    let missing: Vec<_> = want.difference(&have).collect();
    let extra: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing from the policy: {missing:?}; granted but never called: {extra:?}"
    );
}
