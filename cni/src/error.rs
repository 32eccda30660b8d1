//! CNI errors: the spec's code and a message naming the field or variable at fault.

use serde_json::json;

/// Error codes of the CNI specification.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }
    pub fn env(var: &str, details: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, format!("invalid environment variable {var}"), details)
    }
    pub fn config(field: &str, details: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, format!("invalid network config field {field}"), details)
    }

    /// The spec's error JSON.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details }).to_string()
    }
}
