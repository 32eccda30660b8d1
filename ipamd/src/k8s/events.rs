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
        ErrorKind::UnknownAttachment | ErrorKind::VersionMismatch | ErrorKind::BadRequest | ErrorKind::Internal => {
            "AddressAllocationFailed"
        }
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
