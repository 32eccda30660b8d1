//! The call policy every implementation of the seam shares: a token from the node's rate budget
//! before every attempt, retries of throttling (and of transient failures where repeating is
//! safe) with jittered exponential backoff (backon), one deadline for the whole call, and the
//! call statistics. [`crate::aws::Ec2Cloud`] runs its SDK calls through a [`Pacer`]; [`Paced`]
//! puts one in front of any other implementation of the traits (the in-memory EC2 of the tests
//! and the simulator), so the same budget and retry code runs there.

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use ipnet::Ipv4Net;

use crate::budget::{ApiClass, BudgetConfig, RateBudget};
use crate::error::{CloudError, Outcome, Result};
use crate::limits::{InstanceLimits, LimitsSource};
use crate::stats::CallStats;
use crate::types::*;
use crate::{Discovery, Interfaces, RouteTables};

/// How often and how long a call is tried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub call_timeout: Duration,
}

/// The node's budget, retry policy and statistics for cloud calls.
#[derive(Debug, Clone)]
pub struct Pacer {
    budget: Arc<RateBudget>,
    stats: Arc<CallStats>,
    retry: RetryPolicy,
}

impl Pacer {
    pub fn new(budget: BudgetConfig, retry: RetryPolicy) -> Self {
        Pacer {
            budget: Arc::new(RateBudget::new(budget)),
            stats: Arc::new(CallStats::default()),
            retry: RetryPolicy { max_attempts: retry.max_attempts.max(1), ..retry },
        }
    }

    /// The rate budget (its rates now, for the simulator and metrics).
    pub fn budget(&self) -> &RateBudget {
        &self.budget
    }

    /// Calls made so far, by operation and outcome.
    pub fn stats(&self) -> &Arc<CallStats> {
        &self.stats
    }

    /// One call of `op`: `attempt` makes one try. Throttling is always retried (EC2 did nothing);
    /// a transient failure only when `retry_transient` — a 5xx or a lost answer may have followed
    /// EC2 acting, and some requests are refused when repeated (a second attach of the ENI) or act
    /// twice (a count of addresses): their callers read EC2 instead.
    pub async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        class: ApiClass,
        retry_transient: bool,
        attempt: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut + Send,
        Fut: Future<Output = Result<T>> + Send,
    {
        let deadline = tokio::time::Instant::now() + self.retry.call_timeout;
        let attempts = async {
            let mut delays = backon::ExponentialBuilder::default()
                .with_min_delay(self.retry.initial_backoff)
                .with_max_delay(Duration::from_secs(20))
                .with_factor(2.0)
                .with_jitter()
                .with_max_times(self.retry.max_attempts.saturating_sub(1) as usize)
                .build();
            loop {
                // A token that would come after the deadline is not waited for: the call fails as
                // throttled (nothing was sent), not as a timeout whose fate callers must read.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if !self.budget.acquire_within(class, left).await {
                    let e = CloudError::Throttled {
                        op,
                        code: "the node's rate budget (no token before the call's deadline)".into(),
                    };
                    self.stats.record(op, e.outcome());
                    return Err(e);
                }
                let started = tokio::time::Instant::now();
                let res = attempt().await;
                self.stats.latency(op, started.elapsed().as_secs_f64());
                self.stats.record(op, res.as_ref().map_or_else(CloudError::outcome, |_| Outcome::Ok));
                match &res {
                    Ok(_) => self.budget.observe(class, false),
                    Err(CloudError::Throttled { .. }) => self.budget.observe(class, true),
                    Err(_) => {}
                }
                match res {
                    Err(e @ CloudError::Transient { .. }) if !retry_transient => return Err(e),
                    Err(e @ (CloudError::Throttled { .. } | CloudError::Transient { .. })) => match delays.next() {
                        Some(d) => {
                            tracing::debug!(op, error = %e, "cloud call failed; retrying in {d:?}");
                            tokio::time::sleep(d).await;
                        }
                        None => return Err(e),
                    },
                    other => return other,
                }
            }
        };
        let res = match tokio::time::timeout(self.retry.call_timeout, attempts).await {
            Ok(r) => r,
            Err(_) => Err(CloudError::Transient {
                op,
                message: format!("no answer within {:?} (cloud.call_timeout_ms)", self.retry.call_timeout),
            }),
        };
        if let Err(e) = &res {
            tracing::debug!(op, error = %e, "cloud call failed");
        }
        res
    }

    /// Refused before any call: counted as an invalid outcome of `op`.
    pub fn refuse<T>(&self, op: &'static str, e: CloudError) -> Result<T> {
        self.stats.record(op, e.outcome());
        Err(e)
    }
}

/// Any implementation of the seam behind a [`Pacer`]. Requests that are not safe to repeat (a
/// create without an idempotency token, an attach, an assign by count) are not retried on a
/// transient failure, as [`crate::aws::Ec2Cloud`] does not retry them.
#[derive(Debug)]
pub struct Paced<C> {
    inner: Arc<C>,
    pacer: Pacer,
}

impl<C> Paced<C> {
    pub fn new(inner: Arc<C>, pacer: Pacer) -> Self {
        Paced { inner, pacer }
    }

    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }
}

const D: ApiClass = ApiClass::Describe;
const M: ApiClass = ApiClass::Mutating;

impl<C: Discovery> Discovery for Paced<C> {
    async fn instance(&self, instance_id: &str) -> Result<Instance> {
        self.pacer.call("DescribeInstances", D, true, || self.inner.instance(instance_id)).await
    }
    async fn vpc(&self, vpc_id: &str) -> Result<Vpc> {
        self.pacer.call("DescribeVpcs", D, true, || self.inner.vpc(vpc_id)).await
    }
    async fn subnets(&self, ids: &[String]) -> Result<Vec<Subnet>> {
        self.pacer.call("DescribeSubnets", D, true, || self.inner.subnets(ids)).await
    }
    async fn subnets_by_tags(&self, vpc_id: &str, tags: &Tags) -> Result<Vec<Subnet>> {
        self.pacer.call("DescribeSubnets", D, true, || self.inner.subnets_by_tags(vpc_id, tags)).await
    }
    async fn eni(&self, eni_id: &str) -> Result<Eni> {
        self.pacer.call("DescribeNetworkInterfaces", D, true, || self.inner.eni(eni_id)).await
    }
    async fn enis_of_instance(&self, instance_id: &str) -> Result<Vec<Eni>> {
        self.pacer.call("DescribeNetworkInterfaces", D, true, || self.inner.enis_of_instance(instance_id)).await
    }
    async fn enis_by_tags(&self, tags: &Tags) -> Result<Vec<Eni>> {
        self.pacer.call("DescribeNetworkInterfaces", D, true, || self.inner.enis_by_tags(tags)).await
    }
    async fn instance_limits(&self, instance_type: &str) -> Result<(InstanceLimits, LimitsSource)> {
        self.pacer.call("DescribeInstanceTypes", D, true, || self.inner.instance_limits(instance_type)).await
    }
}

impl<C: Interfaces> Interfaces for Paced<C> {
    fn mutating_wait(&self) -> Duration {
        self.pacer.budget().wait(M)
    }
    fn share_of(&self) -> Option<u32> {
        self.pacer.budget().share_of()
    }
    async fn create_eni(&self, req: &CreateEni) -> Result<Eni> {
        self.pacer.call("CreateNetworkInterface", M, false, || self.inner.create_eni(req)).await
    }
    async fn attach_eni(&self, eni_id: &str, instance_id: &str, device_index: u32) -> Result<String> {
        let attach = || self.inner.attach_eni(eni_id, instance_id, device_index);
        self.pacer.call("AttachNetworkInterface", M, false, attach).await
    }
    async fn detach_eni(&self, attachment_id: &str, force: bool) -> Result<()> {
        self.pacer.call("DetachNetworkInterface", M, true, || self.inner.detach_eni(attachment_id, force)).await
    }
    async fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> Result<()> {
        let set = || self.inner.set_delete_on_termination(eni_id, attachment_id);
        self.pacer.call("ModifyNetworkInterfaceAttribute", M, true, set).await
    }
    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        self.pacer.call("DeleteNetworkInterface", M, true, || self.inner.delete_eni(eni_id)).await
    }
    async fn set_source_dest_check(&self, eni_id: &str, enabled: bool) -> Result<()> {
        let set = || self.inner.set_source_dest_check(eni_id, enabled);
        self.pacer.call("ModifyNetworkInterfaceAttribute", M, true, set).await
    }
    async fn assign(&self, known: &Eni, count: AddressCount) -> Result<Assigned> {
        self.pacer.call("AssignPrivateIpAddresses", M, false, || self.inner.assign(known, count)).await
    }
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<()> {
        self.pacer.call("UnassignPrivateIpAddresses", M, true, || self.inner.unassign_ips(eni_id, ips)).await
    }
    async fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> Result<()> {
        let un = || self.inner.unassign_prefixes(eni_id, prefixes);
        self.pacer.call("UnassignPrivateIpAddresses", M, true, un).await
    }
}

impl<C: RouteTables> RouteTables for Paced<C> {
    async fn route_table(&self, table_id: &str) -> Result<RouteTable> {
        self.pacer.call("DescribeRouteTables", D, true, || self.inner.route_table(table_id)).await
    }
    async fn route_table_for_subnet(&self, vpc_id: &str, subnet_id: &str) -> Result<RouteTable> {
        self.pacer.call("DescribeRouteTables", D, true, || self.inner.route_table_for_subnet(vpc_id, subnet_id)).await
    }
    async fn ensure_route(
        &self,
        vpc: &Vpc,
        table_id: &str,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> Result<RouteChange> {
        let ensure = || self.inner.ensure_route(vpc, table_id, destination, target);
        self.pacer.call("CreateRoute", M, true, ensure).await
    }
    async fn replace_route(&self, vpc: &Vpc, table_id: &str, destination: Ipv4Net, target: &RouteTarget) -> Result<()> {
        let replace = || self.inner.replace_route(vpc, table_id, destination, target);
        self.pacer.call("ReplaceRoute", M, true, replace).await
    }
    async fn delete_route(&self, table_id: &str, destination: Ipv4Net) -> Result<()> {
        self.pacer.call("DeleteRoute", M, true, || self.inner.delete_route(table_id, destination)).await
    }
}
