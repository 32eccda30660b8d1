//! One holder at a time, through a coordination.k8s.io Lease: every ipamd tries, the one holding
//! it runs the cluster-wide GC. [`decide`] is the pure rule; [`try_hold`] applies it with the
//! API server's optimistic concurrency (a create or replace that loses a race gets 409 and the
//! loser simply is not the holder), and [`release`] gives the Lease up on a graceful shutdown.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::error::{IpamdError, Result};

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    Acquire,
    /// Someone else holds it and renews it.
    Wait,
}

/// The rule. A Lease whose holder has not renewed within its duration is free; a Lease without a
/// renew time or duration counts as expired.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Step {
    let Some(l) = lease else { return Step::Create };
    match l.holder_identity.as_deref() {
        Some(h) if h == me => Step::Renew,
        None | Some("") => Step::Acquire,
        Some(_) => {
            let until = match (&l.renew_time, l.lease_duration_seconds) {
                (Some(MicroTime(t)), Some(d)) => t.checked_add(SignedDuration::from_secs(d.into())).ok(),
                _ => None,
            };
            match until {
                Some(u) if u > now => Step::Wait,
                _ => Step::Acquire,
            }
        }
    }
}

/// Who holds what: the Lease's namespace, name and duration, and this holder's identity.
#[derive(Debug, Clone)]
pub struct Holder {
    pub namespace: String,
    pub name: String,
    pub me: String,
    pub duration: Duration,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn kube_err(what: &str) -> impl FnOnce(kube::Error) -> IpamdError + '_ {
    move |e| IpamdError::Kube(format!("{what}: {e}"))
}

/// One round: reads the Lease and creates, renews or takes it over when the rule says so.
/// Returns whether we hold it now.
pub async fn try_hold(client: &kube::Client, h: &Holder) -> Result<bool> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &h.namespace);
    let what = format!("Lease {}/{}", h.namespace, h.name);
    let current = api.get_opt(&h.name).await.map_err(kube_err(&what))?;
    let now = Timestamp::now();
    let step = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &h.me, now);
    let secs = i32::try_from(h.duration.as_secs()).unwrap_or(i32::MAX);
    let r = match (step, current) {
        (Step::Wait, _) => return Ok(false),
        (Step::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(h.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(h.me.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        (step, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if step == Step::Acquire {
                spec.holder_identity = Some(h.me.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            // The replace carries the resourceVersion we read: a concurrent writer makes it 409.
            api.replace(&h.name, &PostParams::default(), &lease).await.map(|_| ())
        }
        (_, None) => unreachable!("decide returns Create when there is no Lease"),
    };
    match r {
        Ok(()) => Ok(true),
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(kube_err(&what)(e)),
    }
}

/// Gives the Lease up (if we still hold it), so another ipamd takes over without waiting for it
/// to expire.
pub async fn release(client: &kube::Client, h: &Holder) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &h.namespace);
    let what = format!("Lease {}/{}", h.namespace, h.name);
    let Some(mut lease) = api.get_opt(&h.name).await.map_err(kube_err(&what))? else { return Ok(()) };
    let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
    if spec.holder_identity.as_deref() != Some(h.me.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    match api.replace(&h.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(e) if conflict(&e) => Ok(()),
        Err(e) => Err(kube_err(&what)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixtures::{self, conflict, not_found};
    use serde_json::{Value, json};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn spec(holder: Option<&str>, renewed: Option<i64>, duration: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            renew_time: renewed.map(|s| MicroTime(at(s))),
            lease_duration_seconds: duration,
            ..Default::default()
        }
    }

    #[test]
    fn decide_table() {
        let cases: &[(Option<LeaseSpec>, i64, Step)] = &[
            (None, 0, Step::Create),
            (Some(spec(Some("node-a"), Some(0), Some(60))), 500, Step::Renew),
            (Some(spec(Some("node-b"), Some(0), Some(60))), 59, Step::Wait),
            (Some(spec(Some("node-b"), Some(0), Some(60))), 60, Step::Acquire),
            (Some(spec(Some("node-b"), Some(0), Some(60))), 61, Step::Acquire),
            (Some(spec(None, Some(0), Some(60))), 1, Step::Acquire),
            (Some(spec(Some(""), Some(0), Some(60))), 1, Step::Acquire),
            (Some(spec(Some("node-b"), None, Some(60))), 1, Step::Acquire),
            (Some(spec(Some("node-b"), Some(0), None)), 1, Step::Acquire),
        ];
        for (i, (lease, now, want)) in cases.iter().enumerate() {
            assert_eq!(decide(lease.as_ref(), "node-a", at(*now)), *want, "case {i}");
        }
    }

    fn holder() -> Holder {
        Holder {
            namespace: "kube-system".into(),
            name: "underway-cluster-gc".into(),
            me: "node-a".into(),
            duration: Duration::from_secs(60),
        }
    }

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";

    fn lease(holder: &str, renewed: Timestamp, transitions: i32) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "underway-cluster-gc", "namespace": "kube-system", "resourceVersion": "7"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 60,
                        "renewTime": MicroTime(renewed), "leaseTransitions": transitions}})
    }

    #[tokio::test]
    async fn no_lease_is_created_held_by_us() {
        let (client, mut api) = fixtures::client();
        let t = tokio::spawn(async move { try_hold(&client, &holder()).await });
        let s = api.next().await;
        assert_eq!(s.line(), format!("GET {PATH}/underway-cluster-gc"));
        s.answer(404, not_found("leases.coordination.k8s.io", "underway-cluster-gc"));
        let s = api.next().await;
        assert_eq!(s.line(), format!("POST {PATH}"));
        assert_eq!(s.body["metadata"]["name"], "underway-cluster-gc");
        assert_eq!(s.body["spec"]["holderIdentity"], "node-a");
        assert_eq!(s.body["spec"]["leaseDurationSeconds"], 60);
        let b = s.body.clone();
        s.answer(201, b);
        assert!(t.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_live_holder_is_left_alone() {
        let (client, mut api) = fixtures::client();
        let t = tokio::spawn(async move { try_hold(&client, &holder()).await });
        let s = api.next().await;
        assert_eq!(s.method, "GET");
        s.answer(200, lease("node-b", Timestamp::now(), 3));
        // Exactly one request: no write follows a read that shows a live holder.
        assert!(!t.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn an_expired_holder_is_replaced_with_the_read_resource_version() {
        let (client, mut api) = fixtures::client();
        let t = tokio::spawn(async move { try_hold(&client, &holder()).await });
        let stale = Timestamp::now().checked_sub(SignedDuration::from_secs(120)).unwrap();
        api.next().await.answer(200, lease("node-b", stale, 3));
        let s = api.next().await;
        assert_eq!(s.line(), format!("PUT {PATH}/underway-cluster-gc"));
        assert_eq!(s.body["metadata"]["resourceVersion"], "7");
        assert_eq!(s.body["spec"]["holderIdentity"], "node-a");
        assert_eq!(s.body["spec"]["leaseTransitions"], 4);
        let b = s.body.clone();
        s.answer(200, b);
        assert!(t.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_lost_race_is_not_holding() {
        let (client, mut api) = fixtures::client();
        let t = tokio::spawn(async move { try_hold(&client, &holder()).await });
        api.next().await.answer(200, lease("node-a", Timestamp::now(), 1));
        let s = api.next().await;
        assert_eq!(s.method, "PUT");
        assert_eq!(s.body["spec"]["leaseTransitions"], 1, "a renewal is not a transition");
        s.answer(409, conflict("leases.coordination.k8s.io", "underway-cluster-gc"));
        assert!(!t.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn release_clears_the_holder_only_if_it_is_us() {
        let (client, mut api) = fixtures::client();
        let c = client.clone();
        let t = tokio::spawn(async move { release(&c, &holder()).await });
        api.next().await.answer(200, lease("node-a", Timestamp::now(), 1));
        let s = api.next().await;
        assert_eq!(s.line(), format!("PUT {PATH}/underway-cluster-gc"));
        assert!(s.body["spec"].get("holderIdentity").is_none(), "{}", s.body);
        let b = s.body.clone();
        s.answer(200, b);
        t.await.unwrap().unwrap();
        // Someone else's Lease: read, not written.
        let t = tokio::spawn(async move { release(&client, &holder()).await });
        api.next().await.answer(200, lease("node-b", Timestamp::now(), 1));
        t.await.unwrap().unwrap();
    }
}
