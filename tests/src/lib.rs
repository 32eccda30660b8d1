//! Test harness shared by underway's test suites.
//!
//! - [`localstack`]: one LocalStack per test run on 127.0.0.1, installed into a venv when missing,
//!   killed with its whole process group when the test process ends (even on panic or SIGKILL);
//!   each test takes its own [`localstack::Account`] so tests never see each other's state.
//! - [`front`]: the strict EC2 front every account is reached through: AWS's rules and request
//!   buckets where LocalStack is lenient, seeded faults, a record of every request.
//! - [`imds`]: an IMDSv2 server on loopback serving a map of metadata paths, with tokens checked.
//! - [`world`]: a VPC of node namespaces and a router; [`ipamd`]: a real ipamd inside a node.
//! - [`apiserver`]: a stand-in for the few Kubernetes API paths ipamd uses (no API server runs here).

pub mod apiserver;
pub mod cni;
pub mod fixture;
pub mod front;
pub mod imds;
pub mod internet;
pub mod ipamd;
pub mod kube_proxy;
pub mod localstack;
pub mod netns;
pub mod world;

/// Errors of the harness: a test that cannot set up its world fails with one of these.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("installing LocalStack into {venv}: {reason}")]
    Install { venv: String, reason: String },
    #[error("starting LocalStack: {0}")]
    Start(String),
    #[error("LocalStack at {endpoint} is not healthy after {waited_s} s: {reason}")]
    Unhealthy { endpoint: String, waited_s: u64, reason: String },
    #[error("command failed: {0}")]
    Command(String),
    #[error("EC2 (test set-up): {0}")]
    Ec2(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
