//! The policy file as YAML shapes it (serde). Nothing outside `policy` sees these types: they are
//! validated into [`super::Policy`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// Top level of `policy.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Schema version; must be 1.
    pub version: u32,
    /// Global limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// SSH targets by name.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetFile>,
}

/// `limits:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Longest certificate validity (also the signer's cap), e.g. `1h`.
    pub cert_ttl_max: Option<String>,
    /// Signer rate limit, `COUNT/WINDOW`, e.g. `600/1m`.
    pub signer_rate: Option<String>,
}

/// `targets.<name>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// Host name or IP.
    pub host: String,
    /// SSH port (default 22).
    pub port: Option<u16>,
    /// Roles by name.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleFile>,
}

/// `targets.<name>.roles.<role>:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFile {
    /// Remote user the certificate names.
    pub principal: String,
}
