//! Least privilege, both ways: the IAM policies in deploy/iam grant exactly the EC2 actions ipamd
//! calls — `node.json` for every node (no route action), `vpc-route.json` beside it for VPC-route
//! pools (route changes only) — and every action that changes an ENI ipamd made or a route table
//! is conditioned on the cluster's own tag value. An action called and not granted, or granted and
//! never called, fails here.

use std::collections::{BTreeMap, BTreeSet};

/// The EC2 actions behind each method of the cloud seam (`cloud/src/lib.rs`).
const SEAM: &[(&str, &[&str])] = &[
    ("instance", &["DescribeInstances"]),
    ("vpc", &["DescribeVpcs"]),
    ("subnets", &["DescribeSubnets"]),
    ("subnets_by_tags", &["DescribeSubnets"]),
    ("eni", &["DescribeNetworkInterfaces"]),
    ("enis_of_instance", &["DescribeNetworkInterfaces"]),
    ("enis_by_tags", &["DescribeNetworkInterfaces"]),
    ("instance_limits", &["DescribeInstanceTypes"]),
    // Tags go on in the same call (TagSpecifications), which needs CreateTags.
    ("create_eni", &["CreateNetworkInterface", "CreateTags"]),
    // Delete-on-termination is set right after the attach.
    ("attach_eni", &["AttachNetworkInterface", "ModifyNetworkInterfaceAttribute"]),
    ("detach_eni", &["DetachNetworkInterface"]),
    ("delete_eni", &["DeleteNetworkInterface"]),
    ("set_source_dest_check", &["ModifyNetworkInterfaceAttribute"]),
    ("assign", &["AssignPrivateIpAddresses"]),
    ("unassign_ips", &["UnassignPrivateIpAddresses"]),
    ("unassign_prefixes", &["UnassignPrivateIpAddresses"]),
    ("route_table", &["DescribeRouteTables"]),
    ("route_table_for_subnet", &["DescribeRouteTables"]),
    ("ensure_route", &["DescribeRouteTables", "CreateRoute"]),
    ("replace_route", &["ReplaceRoute"]),
    ("delete_route", &["DeleteRoute"]),
];

const ROUTE_ACTIONS: &[&str] = &["CreateRoute", "ReplaceRoute", "DeleteRoute"];

/// Operation names `cloud/src/aws.rs` passes to its call wrapper.
fn seam_operations() -> BTreeSet<String> {
    let src = include_str!("../../cloud/src/aws.rs");
    let mut out = BTreeSet::new();
    for marker in ["const OP: &str = \"", "self.call(\"", "refuse(\""] {
        for part in src.split(marker).skip(1) {
            let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                out.insert(name);
            }
        }
    }
    out
}

/// ipamd's sources without their unit tests.
fn ipamd_sources() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut text = String::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("fixtures.rs") {
                let s = std::fs::read_to_string(&p).unwrap();
                text += s.split("#[cfg(test)]").next().unwrap_or_default();
            }
        }
    }
    text
}

/// Actions ipamd calls: the seam methods its sources call, mapped to their actions.
fn called() -> BTreeSet<String> {
    let src = ipamd_sources();
    SEAM.iter()
        .filter(|(m, _)| src.contains(&format!(".{m}(")))
        .flat_map(|(_, actions)| actions.iter().map(|a| a.to_string()))
        .collect()
}

/// (action → conditions of the statements granting it) for one policy file.
fn policy(file: &str) -> BTreeMap<String, Vec<serde_json::Value>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/iam").join(file);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("JSON");
    assert_eq!(v["Version"], "2012-10-17");
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for s in v["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow", "{s}");
        let actions: Vec<String> = match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
            other => panic!("Action {other}"),
        };
        for a in actions {
            let a = a.strip_prefix("ec2:").unwrap_or_else(|| panic!("{a}: an EC2 action")).to_string();
            out.entry(a).or_default().push(s["Condition"].clone());
        }
    }
    out
}

#[test]
fn the_seam_map_covers_exactly_what_aws_rs_calls() {
    let mapped: BTreeSet<String> =
        SEAM.iter().flat_map(|(_, a)| a.iter().map(|s| s.to_string())).filter(|a| a != "CreateTags").collect();
    assert_eq!(mapped, seam_operations(), "SEAM above must follow cloud/src/aws.rs");
}

#[test]
fn the_policies_grant_what_ipamd_calls_and_nothing_else() {
    let called = called();
    assert!(called.len() >= 14, "the scan found ipamd's calls: {called:?}");
    assert!(called.contains("DetachNetworkInterface"), "a pending ENI given up is detached: {called:?}");
    let node: BTreeSet<String> = policy("node.json").into_keys().collect();
    let routes: BTreeSet<String> = policy("vpc-route.json").into_keys().collect();
    let want_routes: BTreeSet<String> =
        called.iter().filter(|a| ROUTE_ACTIONS.contains(&a.as_str())).cloned().collect();
    let want_node: BTreeSet<String> = called.difference(&want_routes).cloned().collect();
    assert_eq!(want_routes.len(), 3, "VPC-route mode creates, replaces and deletes routes: {called:?}");
    let check = |name: &str, have: &BTreeSet<String>, want: &BTreeSet<String>| {
        let missing: Vec<_> = want.difference(have).collect();
        let extra: Vec<_> = have.difference(want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}; granted but never called {extra:?}"
        );
    };
    check("node.json (no route action)", &node, &want_node);
    check("vpc-route.json (routes only)", &routes, &want_routes);
}

#[test]
fn changes_to_enis_and_routes_are_conditioned_on_the_clusters_own_tag_value() {
    let by_value = |c: &serde_json::Value, key: &str| c["StringEquals"][key] == "CLUSTER_NAME";
    let node = policy("node.json");
    for a in ["DeleteNetworkInterface", "AttachNetworkInterface", "DetachNetworkInterface"] {
        // Attach and detach also name the instance (an unconditioned statement on instance/*): the ENI side
        // is the one that must carry the cluster's tag.
        assert!(node[a].iter().any(|c| by_value(c, "aws:ResourceTag/underway.io/cluster")), "{a}: {:?}", node[a]);
    }
    assert!(node["DeleteNetworkInterface"].iter().all(|c| by_value(c, "aws:ResourceTag/underway.io/cluster")));
    assert!(
        node["CreateNetworkInterface"].iter().any(|c| by_value(c, "aws:RequestTag/underway.io/cluster")),
        "created ENIs carry the cluster's tag"
    );
    for (a, conds) in policy("vpc-route.json") {
        assert!(conds.iter().all(|c| by_value(c, "aws:ResourceTag/underway.io/cluster")), "{a}: {conds:?}");
    }
    // The value is the cluster tag ipamd puts on what it creates and checks on route tables.
    assert_eq!(underway_cloud::TAG_CLUSTER, "underway.io/cluster");
}
