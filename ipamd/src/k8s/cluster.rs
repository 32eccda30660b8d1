//! The cluster's size, for the EC2 budget (issue 17): every node of a cluster spends from one
//! account's request budget, and a node that knows how many share it keeps to its share after
//! the account first throttles it (`underway_cloud::budget::RateBudget::set_share_of`), and
//! stretches its periodic describes. One list of one Node's metadata tells the count: the API
//! server says how many remain (`remainingItemCount`). One small request a minute per node,
//! whatever the cluster's size, and nothing kept in memory.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;

use crate::error::{IpamdError, Result};

/// The number of Nodes in the cluster, from one list of at most one Node's metadata.
pub async fn node_count(client: &kube::Client) -> Result<u32> {
    let list = Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
        .map_err(|e| IpamdError::Kube(format!("counting Nodes: {e}")))?;
    let more = list.metadata.continue_.as_deref().is_some_and(|c| !c.is_empty());
    let remaining = match list.metadata.remaining_item_count {
        Some(r) if r >= 0 => r,
        // More pages, and the server does not say how many: the count is not known.
        _ if more => {
            return Err(IpamdError::Kube("counting Nodes: the API server did not say how many remain".into()));
        }
        _ => 0,
    };
    Ok(u32::try_from(list.items.len() as i64 + remaining).unwrap_or(u32::MAX).max(1))
}

/// Reads the Node count every `every` and gives each new count to `share` (the budget's
/// `set_share_of`). A failed read keeps the last count and goes to `failed` once until a read
/// succeeds again.
pub async fn share_by_node_count(
    client: kube::Client,
    every: Duration,
    share: impl Fn(u32) + Send,
    failed: impl Fn(String) + Send,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<u32> = None;
    let mut failing = false;
    loop {
        match node_count(&client).await {
            Ok(n) => {
                failing = false;
                if last != Some(n) {
                    tracing::info!("{n} Nodes in the cluster: the EC2 budget is shared {n} ways");
                    share(n);
                    last = Some(n);
                }
            }
            Err(e) if !failing => {
                failing = true;
                failed(e.to_string());
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixtures;
    use serde_json::json;

    fn page(items: usize, meta: serde_json::Value) -> serde_json::Value {
        let items: Vec<_> = (0..items)
            .map(|i| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("n{i}")}}))
            .collect();
        json!({"apiVersion": "v1", "kind": "NodeList", "metadata": meta, "items": items})
    }

    #[tokio::test]
    async fn the_count_is_one_page_of_one_plus_what_remains() {
        // (case, items answered, list metadata, count)
        let cases: [(&str, usize, serde_json::Value, Option<u32>); 4] = [
            (
                "5,000 Nodes",
                1,
                json!({"resourceVersion": "7", "continue": "c", "remainingItemCount": 4999}),
                Some(5000),
            ),
            ("one Node: no more pages", 1, json!({"resourceVersion": "7"}), Some(1)),
            ("an empty list still counts this node", 0, json!({"resourceVersion": "7"}), Some(1)),
            ("more pages, count unknown", 1, json!({"resourceVersion": "7", "continue": "c"}), None),
        ];
        for (name, items, meta, want) in cases {
            let (client, mut api) = fixtures::client();
            let ask = tokio::spawn(async move { node_count(&client).await });
            let s = api.next().await;
            assert_eq!(s.line(), "GET /api/v1/nodes", "{name}");
            assert_eq!(s.query.get("limit").map(String::as_str), Some("1"), "{name}: one Node at most");
            assert!(!s.query.contains_key("watch"), "{name}");
            s.answer(200, page(items, meta));
            assert_eq!(ask.await.unwrap().ok(), want, "{name}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_new_count_goes_to_the_budget_and_a_failure_keeps_the_last() {
        use std::sync::{Arc, Mutex};
        let (client, mut api) = fixtures::client();
        let (seen, errors) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let (s2, e2) = (seen.clone(), errors.clone());
        let task = tokio::spawn(share_by_node_count(
            client,
            // Under the stand-in's 10 s hang guard on the paused clock.
            Duration::from_secs(1),
            move |n| s2.lock().unwrap().push(n),
            move |e| e2.lock().unwrap().push(e),
            stop,
        ));
        let more = |r: i64| json!({"resourceVersion": "1", "continue": "c", "remainingItemCount": r});
        api.next().await.answer(200, page(1, more(99)));
        api.next().await.answer(200, page(1, more(99))); // the same: not given again
        api.next().await.answer(500, json!({"kind": "Status", "status": "Failure", "code": 500}));
        api.next().await.answer(200, page(1, more(2499)));
        let _ = stop_tx.send(true);
        task.await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![100, 2500]);
        let errors = errors.lock().unwrap().clone();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("counting Nodes"), "{errors:?}");
    }
}
