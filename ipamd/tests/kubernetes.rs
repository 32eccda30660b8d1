//! A real ipamd process with its Kubernetes side on, on the test world, against a stand-in API
//! server (`underway_tests::apiserver`: no real API server can run here) listening inside the
//! node's namespace and named by a kubeconfig. It proves the wiring end to end: the client from
//! `KUBECONFIG`, the Node read by name only, the pool its label names, the Node's pod CIDR routed
//! in the VPC, Events for failed Adds, the Lease taken and the cluster GC run by its holder, and
//! the Lease given up and the route removed on SIGTERM. Needs root and LocalStack.

mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::json;
use support::*;
use underway_api::Response;
use underway_cloud::aws::{Ec2Cloud, Ec2Config};
use underway_cloud::{AddressCount, CreateEni, Discovery, Interfaces, eni_tags};
use underway_tests::apiserver::FakeApiServer;
use underway_tests::ipamd::IpamdProcess;

const NODE: &str = "ip-10-0-1-10.ec2.internal";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_takes_its_pool_and_pod_cidr_from_the_cluster() {
    let (w, n) = world("m5.large").await;
    let cloud = Ec2Cloud::from_sdk_config(&w.account().sdk_config(), &Ec2Config::default());
    let pod_cidr: Ipv4Net = "100.64.41.0/28".parse().unwrap();

    // The cluster as ipamd will see it: its Node, labelled into the "routed" pool, with a pod CIDR.
    let api = FakeApiServer::in_ns(&n.ns).unwrap();
    api.put_node(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "resourceVersion": "1", "labels": {"underway.dev/pool": "routed"}},
        "spec": {"podCIDR": pod_cidr.to_string(), "providerID": format!("aws:///us-east-1a/{}", n.instance_id)}}));
    api.put_node(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "another-node", "resourceVersion": "1", "labels": {"underway.dev/pool": "other"}}}));
    api.put_pool(json!({"apiVersion": "underway.dev/v1alpha1", "kind": "UnderwayPool",
        "metadata": {"name": "routed", "resourceVersion": "1"},
        "spec": {"mode": "vpc-route", "vpc_route": {"cluster_cidr": "100.64.0.0/16"}}}));

    // What a node that is gone left behind: the elected GC must delete it.
    let dead = w.ec2().run_instance("m5.large").await;
    w.ec2().terminate(&dead).await;
    let long_ago = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 3600;
    let leaked = cloud
        .create_eni(&CreateEni {
            subnet_id: w.ec2().subnet_id.clone(),
            security_groups: vec![w.ec2().security_group.clone()],
            description: "left by a dead node".into(),
            tags: eni_tags(w.id(), &dead, long_ago),
            initial: AddressCount::default(),
        })
        .await
        .unwrap()
        .id;

    // The file says ENI mode; the cluster says otherwise.
    let extra = format!(
        "cooldown_ms = 1000\nadd_wait_ms = 500\nreconcile_interval_ms = 500\n\
         [kubernetes]\nenabled = true\nnode_name = \"{NODE}\"\ngc = {{ interval_ms = 1000, lease_duration_s = 15 }}\n"
    );
    let kc = api.kubeconfig_path();
    let mut p =
        IpamdProcess::start_with_env(&w, &n, std::path::Path::new(IPAMD), &extra, &[("KUBECONFIG", &kc)]).unwrap();
    eventually(
        Duration::from_secs(60),
        "ipamd ready with the cluster's settings",
        || matches!(p.call(&underway_api::Request::Status), Ok(Response::Status(s)) if s.ready && s.reason == "serving"),
    );

    // The pool and pod CIDR came from the cluster.
    let cfg: serde_json::Value = serde_json::from_str(&p.http_get(61781, "/v1/config").unwrap()).unwrap();
    assert_eq!(cfg["mode"], "vpc-route", "{cfg}");
    assert_eq!(cfg["pool"], "routed");
    assert_eq!(cfg["vpc_route"]["pod_cidr"], pod_cidr.to_string());
    let main = main_table(&w).await;
    assert!(
        routes(&w, &main).await.contains(&(pod_cidr.to_string(), primary_eni(&w, &n).await)),
        "the Node's pod CIDR is routed to its primary ENI"
    );

    // Fill the /28; the Adds that find no address fail, each with an Event on its pod.
    let answers = add_parallel(&p, "web", 20);
    let mut failed = Vec::new();
    for (name, r) in &answers {
        match r {
            Response::Added(a) => assert!(pod_cidr.contains(&a.address), "{name}: {a:?}"),
            Response::Error(e) => failed.push((name.clone(), e.clone())),
            other => panic!("{other:?}"),
        }
    }
    let given: BTreeSet<Ipv4Addr> =
        answers.iter().filter_map(|(_, r)| if let Response::Added(a) = r { Some(a.address) } else { None }).collect();
    assert_eq!(given.len(), answers.len() - failed.len(), "no address twice");
    assert!(!failed.is_empty() && given.len() >= 10, "{} given, {} failed", given.len(), failed.len());
    eventually(Duration::from_secs(20), "an Event for every failed Add", || api.events().len() >= failed.len());
    for (name, e) in &failed {
        let ev = api
            .events()
            .into_iter()
            .find(|ev| ev["regarding"]["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no Event for {name}: {:?}", api.events()));
        assert_eq!(ev["regarding"]["kind"], "Pod");
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["reason"], underway_ipamd::k8s::events::reason(e.kind), "{ev}");
        assert_eq!(ev["reportingInstance"], NODE);
        assert!(ev["note"].as_str().unwrap_or_default().contains("no free address"), "{ev}");
    }

    // This ipamd holds the Lease and its GC deleted the dead node's ENI.
    eventually(Duration::from_secs(30), "the Lease held by this node", || {
        api.lease("underway-cluster-gc").is_some_and(|l| l["spec"]["holderIdentity"] == NODE)
    });
    let t = std::time::Instant::now();
    loop {
        match cloud.eni(&leaked).await {
            Err(underway_cloud::CloudError::NotFound { .. }) => break,
            Ok(_) => assert!(t.elapsed() < Duration::from_secs(30), "the leaked ENI {leaked} is still there"),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = p.http_get(61780, "/metrics").unwrap();
    assert!(metrics.contains("underway_cluster_gc_lease_held 1"), "{metrics}");
    assert_eq!(sample(&metrics, "underway_cluster_gc_deleted_total{kind=\"eni\"}"), Some(1.0), "{metrics}");

    // What it asked the API server: its own Node only (and the Nodes' count, one at most), its
    // pool, never pods.
    let requests = api.requests();
    let node_requests: Vec<&String> = requests.iter().filter(|r| r.starts_with("GET /api/v1/nodes")).collect();
    let selector = format!("fieldSelector=metadata.name%3D{NODE}");
    let (own, count): (Vec<&String>, Vec<&String>) = node_requests.iter().partition(|r| r.contains(&selector));
    assert!(own.len() >= 2, "a list and a watch: {requests:?}");
    assert!(!count.is_empty(), "the Node count for the EC2 budget's share: {requests:?}");
    assert!(count.iter().all(|r| r.contains("limit=1") && !r.contains("watch")), "{count:?}");
    assert!(requests.iter().any(|r| r == "GET /apis/underway.dev/v1alpha1/underwaypools/routed"), "{requests:?}");
    assert!(!requests.iter().any(|r| r.contains("/pods")), "{requests:?}");

    // SIGTERM: the Lease is given up; the route stays (a rolling update must not black-hole the
    // node's pods).
    assert!(p.stop(), "{}", p.log_text());
    let lease = api.lease("underway-cluster-gc").unwrap();
    assert!(lease["spec"].get("holderIdentity").is_none_or(|h| h.is_null()), "{lease}");
    assert!(routes(&w, &main).await.iter().any(|(d, _)| *d == pod_cidr.to_string()));

    // deploy/k8s/rbac.yaml grants what these requests needed, and nothing they did not.
    let used: BTreeSet<(String, String, String)> = api.requests().iter().filter_map(|r| permission(r)).collect();
    let granted = granted();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(missing.is_empty(), "rbac.yaml lacks {missing:?}");
    // kube's event recorder PATCHes a repeated Event into a series (tested in k8s::events);
    // 20 distinct pods here never repeat one.
    let series = ("events.k8s.io".to_string(), "events".to_string(), "patch".to_string());
    let unused: Vec<_> = granted.difference(&used).filter(|g| **g != series).collect();
    assert!(unused.is_empty(), "rbac.yaml grants {unused:?}, which ipamd never used");
    // Named requests are scoped by name where RBAC can scope them: every get/update of a Lease
    // names ipamd's own, and the rule allowing them lists that name alone.
    let names = resource_names();
    for line in api.requests() {
        let Some((g, r, v)) = permission(&line) else { continue };
        let Some(allowed) = names.get(&(g.clone(), r.clone(), v.clone())) else { continue };
        let name = line.split('?').next().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
        assert!(allowed.contains(&name), "{line}: {name} is not among {allowed:?}");
    }
    let lease = ("coordination.k8s.io".to_string(), "leases".to_string(), "update".to_string());
    assert_eq!(names.get(&lease), Some(&vec!["underway-cluster-gc".to_string()]), "the Lease rule is scoped by name");
}

/// (API group, resource, verb) → the resourceNames its rule is limited to (rules with names only).
fn resource_names() -> std::collections::BTreeMap<(String, String, String), Vec<String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/rbac.yaml");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for d in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        for rule in d["rules"].as_array().unwrap() {
            let Some(names) = rule["resourceNames"].as_array() else { continue };
            let strs = |k: &str| -> Vec<String> {
                rule[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
            };
            for g in strs("apiGroups") {
                for r in strs("resources") {
                    for v in strs("verbs") {
                        let n = names.iter().map(|n| n.as_str().unwrap().to_string()).collect();
                        out.insert((g.clone(), r.clone(), v), n);
                    }
                }
            }
        }
    }
    out
}

/// (API group, resource, verb) a request line needs.
fn permission(line: &str) -> Option<(String, String, String)> {
    let (method, target) = line.split_once(' ')?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/<res>[/<name>] or /apis/<group>/<v>/[namespaces/<ns>/]<res>[/<name>]
    let (group, rest) = match parts.as_slice() {
        ["api", _, rest @ ..] => (String::new(), rest),
        ["apis", g, _, rest @ ..] => (g.to_string(), rest),
        _ => return None,
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 { &rest[2..] } else { rest };
    let named = rest.len() > 1;
    let verb = match (method, named) {
        ("GET", _) if query.contains("watch=true") => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => return None,
    };
    Some((group, rest[0].to_string(), verb.to_string()))
}

/// Every (API group, resource, verb) the ClusterRole and Role in deploy/k8s/rbac.yaml grant.
fn granted() -> BTreeSet<(String, String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/rbac.yaml");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for d in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        for rule in d["rules"].as_array().unwrap() {
            let strs = |k: &str| -> Vec<String> {
                rule[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
            };
            for g in strs("apiGroups") {
                for r in strs("resources") {
                    for v in strs("verbs") {
                        out.insert((g.clone(), r.clone(), v));
                    }
                }
            }
        }
    }
    out
}
