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
