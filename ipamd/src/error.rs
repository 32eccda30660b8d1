//! ipamd's errors: one enum for the crate.

use underway_cloud::CloudError;
use underway_routes::RoutesError;

#[derive(Debug, thiserror::Error)]
pub enum IpamdError {
    /// A configuration field is wrong; `field` is its dotted path.
    #[error("config: {field}: {reason}")]
    Config { field: String, reason: String },
    #[error("state store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("datapath: {0}")]
    Routes(#[from] RoutesError),
    /// The API server refused or could not be reached (only with `kubernetes.enabled`).
    #[error("kubernetes: {0}")]
    Kube(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

impl IpamdError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IpamdError {
        let what = what.into();
        move |source| IpamdError::Io { what, source }
    }
}

pub type Result<T, E = IpamdError> = std::result::Result<T, E>;
