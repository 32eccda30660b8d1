//! The cloud seam of underway.
//!
//! ipamd talks to the cloud only through the traits here: [`Discovery`] (what exists),
//! [`Interfaces`] (ENIs and their addresses) and [`RouteTables`] (VPC routes). [`aws::Ec2Cloud`]
//! implements them on EC2 with the AWS SDK; another cloud implements the same traits.
//! Errors are typed ([`CloudError`]) so callers decide on throttling, limits and absence without
//! reading strings; every call is rate-budgeted ([`budget`]) and counted ([`stats`]).

pub mod aws;
pub mod budget;
pub mod error;
pub mod fake;
pub mod imds;
pub mod limits;
pub mod pace;
pub mod stats;
pub mod types;

use std::future::Future;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub use error::{CloudError, LimitKind, Outcome, Result};
pub use limits::{InstanceLimits, LimitsSource};
pub use types::*;

/// Read-only questions: instances, VPCs, subnets, ENIs, instance-type limits.
pub trait Discovery: Send + Sync {
    fn instance(&self, instance_id: &str) -> impl Future<Output = Result<Instance>> + Send;
    fn vpc(&self, vpc_id: &str) -> impl Future<Output = Result<Vpc>> + Send;
    /// Subnets by id; an empty list asks for none.
    fn subnets(&self, ids: &[String]) -> impl Future<Output = Result<Vec<Subnet>>> + Send;
    /// Subnets of a VPC carrying every given tag (`key` → `value`).
    fn subnets_by_tags(&self, vpc_id: &str, tags: &Tags) -> impl Future<Output = Result<Vec<Subnet>>> + Send;
    fn eni(&self, eni_id: &str) -> impl Future<Output = Result<Eni>> + Send;
    /// ENIs attached to an instance, by device index.
    fn enis_of_instance(&self, instance_id: &str) -> impl Future<Output = Result<Vec<Eni>>> + Send;
    /// ENIs carrying every given tag (how GC finds what this cluster created).
    fn enis_by_tags(&self, tags: &Tags) -> impl Future<Output = Result<Vec<Eni>>> + Send;
    /// Limits of an instance type: the API first, the embedded table when the API fails.
    fn instance_limits(
        &self,
        instance_type: &str,
    ) -> impl Future<Output = Result<(InstanceLimits, LimitsSource)>> + Send;
}

/// ENI lifecycle and addresses.
pub trait Interfaces: Send + Sync {
    /// How long until this node's rate budget would let a mutating call go (zero for a cloud
    /// without one). A step that cannot make its mutating call soon skips the describes that
    /// would precede it: at thousands of nodes those are the scarcer budget.
    fn mutating_wait(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// How many nodes this node's budget shares the account with, once known (configured, or
    /// the cluster's Node count): periodic describes stretch with it.
    fn share_of(&self) -> Option<u32> {
        None
    }
    /// Creates an ENI with its first addresses in the same call.
    fn create_eni(&self, req: &CreateEni) -> impl Future<Output = Result<Eni>> + Send;
    /// Attaches at a device index (≥ 1) and returns the attachment id. EC2 leaves
    /// delete-on-termination off for an attached ENI: [`set_delete_on_termination`] is a second
    /// mutating call, which the caller makes (and spends its budget on) itself.
    ///
    /// [`set_delete_on_termination`]: Interfaces::set_delete_on_termination
    fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> impl Future<Output = Result<String>> + Send;
    fn detach_eni(&self, attachment_id: &str, force: bool) -> impl Future<Output = Result<()>> + Send;
    /// Lets EC2 delete the attached ENI with its instance (after every attach; an ENI that outlives
    /// its instance is a leak).
    fn set_delete_on_termination(&self, eni_id: &str, attachment_id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Deletes an ENI, refusing (`InUse`) one that is attached, whatever the cloud would allow.
    fn delete_eni(&self, eni_id: &str) -> impl Future<Output = Result<()>> + Send;
    fn set_source_dest_check(&self, eni_id: &str, enabled: bool) -> impl Future<Output = Result<()>> + Send;
    /// Adds addresses to an ENI. `known` is the caller's current view of it; the result holds only
    /// the addresses the call added (LocalStack answers with all of them, AWS with the new ones).
    fn assign(&self, known: &Eni, count: AddressCount) -> impl Future<Output = Result<Assigned>> + Send;
    fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> impl Future<Output = Result<()>> + Send;
    fn unassign_prefixes(&self, eni_id: &str, prefixes: &[Ipv4Net]) -> impl Future<Output = Result<()>> + Send;
}

/// VPC route tables.
pub trait RouteTables: Send + Sync {
    fn route_table(&self, table_id: &str) -> impl Future<Output = Result<RouteTable>> + Send;
    /// The table associated with the subnet, else the VPC's main table.
    fn route_table_for_subnet(&self, vpc_id: &str, subnet_id: &str) -> impl Future<Output = Result<RouteTable>> + Send;
    /// Creates the route when absent; `Unchanged` when it exists with this target; `InUse` naming
    /// the current target when it points elsewhere (replacing is the caller's decision).
    fn ensure_route(
        &self,
        vpc: &Vpc,
        table_id: &str,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> impl Future<Output = Result<RouteChange>> + Send;
    fn replace_route(
        &self,
        vpc: &Vpc,
        table_id: &str,
        destination: Ipv4Net,
        target: &RouteTarget,
    ) -> impl Future<Output = Result<()>> + Send;
    fn delete_route(&self, table_id: &str, destination: Ipv4Net) -> impl Future<Output = Result<()>> + Send;
}

/// Everything ipamd needs from a cloud.
pub trait Cloud: Discovery + Interfaces + RouteTables {}
impl<T: Discovery + Interfaces + RouteTables> Cloud for T {}
