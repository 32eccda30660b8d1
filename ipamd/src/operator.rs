//! The operator's views (`underway-ipamd pods | enis | routes | errors | pool`): the running
//! ipamd's introspection API (`introspection_listen`, loopback) read and printed as aligned
//! tables, or as the API's JSON with `-o json`. What an operator looks at when `kubectl describe
//! pod` says an address could not be given. The rendering is pure (table tests below).

use serde_json::Value;

use crate::clock::unix_ms;
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pods,
    Enis,
    Routes,
    Errors,
    Pool,
}

/// Fetches what `kind` shows and renders it (`json`: pretty JSON as the API gave it).
pub fn show(cfg: &Config, kind: Kind, json: bool) -> Result<String, String> {
    let addr =
        cfg.introspection_listen.ok_or("introspection_listen is off in the config: the operator's views read it")?;
    let get = |path: &str| -> Result<Value, String> {
        let (code, body) = crate::http::http_get(addr, path)?;
        if code != 200 {
            return Err(format!("{addr}{path}: HTTP {code}: {}", body.trim()));
        }
        serde_json::from_str(&body).map_err(|e| format!("{addr}{path}: not JSON: {e}"))
    };
    let v = match kind {
        Kind::Pods => get("/v1/assignments")?,
        Kind::Enis => get("/v1/enis")?,
        Kind::Routes => get("/v1/routes")?,
        Kind::Errors => get("/v1/errors")?,
        Kind::Pool => serde_json::json!({ "status": get("/v1/status")?, "enis": get("/v1/enis")? }),
    };
    if json {
        return Ok(serde_json::to_string_pretty(&v).expect("JSON serialises") + "\n");
    }
    Ok(render(kind, &v, unix_ms()))
}

/// The table (or, for `pool`, the summary) of `kind` from the API's answer, with ages against
/// `now_ms`.
pub fn render(kind: Kind, v: &Value, now_ms: u64) -> String {
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match kind {
        Kind::Pods => table(
            &["ADDRESS", "POD", "CONTAINER", "IFNAME", "NETWORK", "AGE"],
            rows(v)
                .iter()
                .map(|a| {
                    let pod = match (a["namespace"].as_str(), a["name"].as_str()) {
                        (Some(ns), Some(n)) => format!("{ns}/{n}"),
                        _ => "-".into(),
                    };
                    let container: String = s(&a["key"]["container_id"]).chars().take(12).collect();
                    let age = a["assigned_at"].as_u64().filter(|t| *t > 0).map(|t| age(now_ms, t));
                    vec![
                        s(&a["address"]),
                        pod,
                        container,
                        s(&a["key"]["ifname"]),
                        s(&a["key"]["network"]),
                        age.unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect(),
        ),
        Kind::Enis => table(
            &["ENI", "DEVICE", "TABLE", "FREE", "ASSIGNED", "COOLING", "RELEASING", "PREFIXES"],
            rows(v)
                .iter()
                .map(|e| {
                    let prefixes: Vec<String> = e["prefixes"].as_array().into_iter().flatten().map(&s).collect();
                    vec![
                        s(&e["id"]),
                        s(&e["device_index"]),
                        e["route_table"].as_u64().map_or("main".into(), |t| t.to_string()),
                        s(&e["free"]),
                        s(&e["assigned"]),
                        s(&e["cooling"]),
                        s(&e["releasing"]),
                        if prefixes.is_empty() { "-".into() } else { prefixes.join(",") },
                    ]
                })
                .collect(),
        ),
        Kind::Routes => table(
            &["ADDRESS", "POD", "ENI", "TABLE", "HOST ROUTE"],
            rows(v)
                .iter()
                .map(|r| {
                    vec![
                        s(&r["address"]),
                        s(&r["pod"]),
                        s(&r["eni"]),
                        s(&r["table"]),
                        match (r["host_veth"].as_str(), r["veth_matches"].as_bool()) {
                            (Some(name), Some(false)) => format!("via {name} (ANOTHER POD'S)"),
                            (Some(name), _) => format!("via {name}"),
                            (None, _) => "MISSING".into(),
                        },
                    ]
                })
                .collect(),
        ),
        Kind::Errors => table(
            &["AGO", "WHAT"],
            rows(v)
                .iter()
                .rev()
                .map(|e| vec![e["at_ms"].as_u64().map_or("-".into(), |t| age(now_ms, t)), s(&e["what"])])
                .collect(),
        ),
        Kind::Pool => {
            let st = &v["status"];
            let sum = |f: &str| rows(&v["enis"]).iter().filter_map(|e| e[f].as_u64()).sum::<u64>();
            let ready = if st["ready"].as_bool() == Some(true) { "yes" } else { "no" };
            let mut out = format!("ready:    {ready} ({})\n", s(&st["line"]));
            if let Some(node) = st["node"].as_object() {
                let id = node.get("id").map(&s).unwrap_or_default();
                let ty = node.get("instance_type").map(&s).unwrap_or_default();
                out += &format!("node:     {id} ({ty})\n");
            }
            if !st["blocker"].is_null() {
                out += &format!("blocked:  {}\n", st["blocker"]);
            }
            out += &format!(
                "enis:     {}\naddresses: {} free, {} assigned, {} cooling, {} releasing\n",
                rows(&v["enis"]).len(),
                sum("free"),
                sum("assigned"),
                sum("cooling"),
                sum("releasing")
            );
            out
        }
    }
}

/// "3s", "4m12s", "2h5m", "3d4h".
fn age(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Columns left-aligned, two spaces apart, the header first; "(none)" under it when empty.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            l += &c;
            if i < last {
                l += &" ".repeat(width[i] - c.chars().count() + 2);
            }
        }
        l + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    if rows.is_empty() {
        out += "(none)\n";
    }
    for r in rows {
        out += &line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_view_renders_its_table() {
        let now = 1_000_000_000;
        let pods = json!([
            {"address": "10.0.1.5", "key": {"network": "underway", "container_id": "0123456789abcdef", "ifname": "eth0"},
             "namespace": "shop", "name": "cart-0", "assigned_at": now - 312_000, "netns": "/var/run/netns/x"},
            {"address": "10.0.1.17", "key": {"network": "recovered", "container_id": "uwdeadbeef", "ifname": "eth0"},
             "namespace": null, "name": null, "assigned_at": 0, "netns": null}
        ]);
        let cases: Vec<(Kind, Value, &str)> = vec![
            (
                Kind::Pods,
                pods,
                "ADDRESS    POD          CONTAINER     IFNAME  NETWORK    AGE\n\
                 10.0.1.5   shop/cart-0  0123456789ab  eth0    underway   5m12s\n\
                 10.0.1.17  -            uwdeadbeef    eth0    recovered  -\n",
            ),
            (
                Kind::Enis,
                json!([{"id": "eni-1", "device_index": 0, "route_table": null, "prefixes": [], "free": 3, "assigned": 6, "cooling": 0, "releasing": 0},
                       {"id": "eni-2", "device_index": 1, "route_table": 101, "prefixes": ["10.0.2.16/28"], "free": 16, "assigned": 0, "cooling": 1, "releasing": 0}]),
                "ENI    DEVICE  TABLE  FREE  ASSIGNED  COOLING  RELEASING  PREFIXES\n\
                 eni-1  0       main   3     6         0        0          -\n\
                 eni-2  1       101    16    0         1        0          10.0.2.16/28\n",
            ),
            (
                Kind::Routes,
                json!([{"address": "10.0.2.20", "pod": "shop/cart-0", "eni": "eni-2", "table": "101", "host_veth": "uw0123456789a", "veth_matches": true},
                       {"address": "10.0.1.9", "pod": null, "eni": "eni-1", "table": "main", "host_veth": null, "veth_matches": null},
                       {"address": "10.0.1.7", "pod": "a/b", "eni": "eni-1", "table": "main", "host_veth": "uwfeed", "veth_matches": false}]),
                "ADDRESS    POD          ENI    TABLE  HOST ROUTE\n\
                 10.0.2.20  shop/cart-0  eni-2  101    via uw0123456789a\n\
                 10.0.1.9   -            eni-1  main   MISSING\n\
                 10.0.1.7   a/b          eni-1  main   via uwfeed (ANOTHER POD'S)\n",
            ),
            (Kind::Errors, json!([]), "AGO  WHAT\n(none)\n"),
            (
                Kind::Errors,
                json!([{"at_ms": now - 7_200_000, "what": "old"}, {"at_ms": now - 3_000, "what": "subnet exhausted"}]),
                "AGO   WHAT\n3s    subnet exhausted\n2h0m  old\n",
            ),
            (
                Kind::Pool,
                json!({"status": {"ready": false, "line": "waiting for the node's identity", "blocker": null, "node": null},
                       "enis": [{"free": 2, "assigned": 1, "cooling": 1, "releasing": 0}]}),
                "ready:    no (waiting for the node's identity)\nenis:     1\naddresses: 2 free, 1 assigned, 1 cooling, 0 releasing\n",
            ),
        ];
        for (kind, v, want) in cases {
            assert_eq!(render(kind, &v, now), want, "{kind:?}");
        }
    }
}
