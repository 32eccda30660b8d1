//! Events on pods whose Add failed: `kubectl describe pod` then says why (subnet exhausted, ENI
//! limit, throttled...), not only the runtime's "failed to set up sandbox".
//!
//! The RPC handler never waits for the API server: it drops a [`FailedAdd`] into a bounded
//! channel (dropped when full) and [`run`] publishes it through kube's event recorder
//! (events.k8s.io/v1; a repeat within minutes becomes a series on the same Event).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use underway_api::ErrorKind;

/// One failed Add, for the pod it was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAdd {
    pub namespace: String,
    pub name: String,
    pub kind: ErrorKind,
    pub message: String,
}

/// The Event reason for an error kind (PascalCase, as `kubectl describe` shows it).
pub fn reason(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotReady => "IpamdNotReady",
        ErrorKind::PoolEmpty => "NoFreeAddress",
        ErrorKind::SubnetExhausted => "SubnetExhausted",
        ErrorKind::EniLimitReached => "EniLimitReached",
        ErrorKind::Throttled => "CloudThrottled",
        ErrorKind::RouteTableFull => "RouteTableFull",
        ErrorKind::RouteConflict => "RouteConflict",
        ErrorKind::UnknownAttachment
        | ErrorKind::VersionMismatch
        | ErrorKind::BadRequest
        | ErrorKind::Internal
        | ErrorKind::Other => "AddressAllocationFailed",
    }
}

/// The reporter: the controller name and this node, so events from many nodes stay apart.
pub fn reporter(node: &str) -> Reporter {
    Reporter { controller: "underway-ipamd".into(), instance: Some(node.into()) }
}

/// Publishes each failed Add as a Warning on its pod until the channel closes. A refused Event
/// is logged and dropped: it is a courtesy, never a reason to fail anything.
pub async fn run(client: kube::Client, node: &str, mut rx: mpsc::Receiver<FailedAdd>) {
    let recorder = Recorder::new(client, reporter(node));
    while let Some(f) = rx.recv().await {
        let pod = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(f.namespace.clone()),
            name: Some(f.name.clone()),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason(f.kind).into(),
            // The API refuses a note over 1 kB.
            note: Some(f.message.chars().take(1000).collect()),
            action: "AllocateAddress".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &pod).await {
            tracing::warn!("Event on pod {}/{}: {e}", f.namespace, f.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixtures;

    fn failed(kind: ErrorKind) -> FailedAdd {
        FailedAdd {
            namespace: "shop".into(),
            name: "cart-1".into(),
            kind,
            message: "no free address after 15000 ms: subnet subnet-1 has no free addresses".into(),
        }
    }

    #[test]
    fn every_failure_kind_has_a_pascal_case_reason() {
        use ErrorKind::*;
        for k in [NotReady, PoolEmpty, SubnetExhausted, EniLimitReached, Throttled, RouteTableFull, Internal] {
            let r = reason(k);
            assert!(r.len() <= 128 && r.starts_with(|c: char| c.is_ascii_uppercase()), "{k:?}: {r}");
            assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{k:?}: {r}");
        }
        assert_eq!(reason(SubnetExhausted), "SubnetExhausted");
        assert_eq!(reason(Throttled), "CloudThrottled");
    }

    #[tokio::test]
    async fn a_failed_add_becomes_a_warning_on_its_pod_and_a_repeat_a_series() {
        let (client, mut api) = fixtures::client();
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(async move { run(client, "node-a", rx).await });
        tx.send(failed(ErrorKind::SubnetExhausted)).await.unwrap();
        let s = api.next().await;
        assert_eq!(s.line(), "POST /apis/events.k8s.io/v1/namespaces/shop/events");
        let b = s.body.clone();
        assert_eq!(b["type"], "Warning");
        assert_eq!(b["reason"], "SubnetExhausted");
        assert_eq!(b["action"], "AllocateAddress");
        assert_eq!(b["regarding"]["kind"], "Pod");
        assert_eq!(b["regarding"]["namespace"], "shop");
        assert_eq!(b["regarding"]["name"], "cart-1");
        assert_eq!(b["reportingController"], "underway-ipamd");
        assert_eq!(b["reportingInstance"], "node-a");
        assert!(b["note"].as_str().unwrap().contains("subnet-1 has no free addresses"), "{b}");
        let name = b["metadata"]["name"].as_str().unwrap().to_string();
        s.answer(201, b);
        tx.send(failed(ErrorKind::SubnetExhausted)).await.unwrap();
        let s = api.next().await;
        assert_eq!(s.line(), format!("PATCH /apis/events.k8s.io/v1/namespaces/shop/events/{name}"));
        assert_eq!(s.body["series"]["count"], 2);
        let b = s.body.clone();
        s.answer(200, b);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_event_is_dropped_and_the_next_is_sent() {
        let (client, mut api) = fixtures::client();
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(async move { run(client, "node-a", rx).await });
        tx.send(failed(ErrorKind::Throttled)).await.unwrap();
        let s = api.next().await;
        s.answer(
            403,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "events.events.k8s.io is forbidden", "reason": "Forbidden", "code": 403}),
        );
        tx.send(failed(ErrorKind::EniLimitReached)).await.unwrap();
        let s = api.next().await;
        assert_eq!(s.method, "POST");
        assert_eq!(s.body["reason"], "EniLimitReached");
        let b = s.body.clone();
        s.answer(201, b);
        drop(tx);
        task.await.unwrap();
    }
}
