//! Policy: the typed, validated form of `policy.yaml`.
//!
//! Pure: parsing and validation take text and return values; nothing here reads files except
//! [`load_file`], a thin wrapper. `file` holds the serde (YAML-shaped) types, which become a
//! [`Policy`] through `TryFrom` and are never seen elsewhere.

pub mod file;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::signer::custody::{HARD_MAX_CERT_TTL_SECS, valid_principal};
use crate::time::parse_duration;

/// The built-in development policy used by `ephyr serve --dev`.
pub const DEV_POLICY: &str = include_str!("../../../policies/dev.yaml");

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Global limits.
    pub limits: Limits,
    /// SSH targets by name.
    pub targets: BTreeMap<String, Target>,
}

/// Global limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest certificate validity.
    pub cert_ttl_max: Duration,
    /// Signatures per window the signer allows.
    pub signer_rate: u32,
    /// The window.
    pub signer_window: Duration,
}

/// An SSH target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role name → principal.
    pub roles: BTreeMap<String, String>,
}

/// Why a policy did not load: every problem found, each with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// One entry per problem: `path: message`.
    pub problems: Vec<String>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Parses and validates YAML text; `origin` names the source in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let raw: file::PolicyFile = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!("{origin}:{}:{}", l.line(), l.column())).unwrap_or(origin.into());
            PolicyError { problems: vec![format!("{at}: {e}")] }
        })?;
        Policy::try_from(raw).map_err(|mut e| {
            for p in &mut e.problems {
                *p = format!("{origin}: {p}");
            }
            e
        })
    }

    /// Every principal any target role uses: the signer's allow-list.
    pub fn signer_principals(&self) -> BTreeSet<String> {
        self.targets.values().flat_map(|t| t.roles.values().cloned()).collect()
    }
}

/// Reads and parses a policy file.
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PolicyError { problems: vec![format!("{}: {e}", path.display())] })?;
    Policy::parse(&text, &path.display().to_string())
}

fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let (n, w) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected COUNT/WINDOW, e.g. 600/1m"))?;
    let n: u32 = n.trim().parse().map_err(|_| format!("{s:?}: COUNT must be a positive integer"))?;
    let w = parse_duration(w).map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 || w.as_secs() == 0 {
        return Err(format!("{s:?}: COUNT and WINDOW must be at least 1 and 1s"));
    }
    Ok((n, w))
}

impl TryFrom<file::PolicyFile> for Policy {
    type Error = PolicyError;

    fn try_from(raw: file::PolicyFile) -> Result<Self, PolicyError> {
        let mut problems = Vec::new();
        if raw.version != 1 {
            problems.push(format!("version: unsupported policy version {} (this broker reads version 1)", raw.version));
        }
        let cert_ttl_max = match raw.limits.cert_ttl_max.as_deref().map(parse_duration) {
            None => Duration::from_secs(3600),
            Some(Ok(d)) if d.as_secs() >= 1 && d.as_secs() <= u64::from(HARD_MAX_CERT_TTL_SECS) => d,
            Some(Ok(_)) => {
                problems.push("limits.cert_ttl_max: must be between 1s and 24h".into());
                Duration::from_secs(3600)
            }
            Some(Err(e)) => {
                problems.push(format!("limits.cert_ttl_max: {e}"));
                Duration::from_secs(3600)
            }
        };
        let (signer_rate, signer_window) = match raw.limits.signer_rate.as_deref().map(parse_rate) {
            None => (600, Duration::from_secs(60)),
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                problems.push(format!("limits.signer_rate: {e}"));
                (600, Duration::from_secs(60))
            }
        };
        let mut targets = BTreeMap::new();
        for (name, t) in raw.targets {
            if t.host.trim().is_empty() {
                problems.push(format!("targets.{name}.host: must not be empty"));
            }
            let mut roles = BTreeMap::new();
            for (role, r) in t.roles {
                if !valid_principal(&r.principal) {
                    problems.push(format!(
                        "targets.{name}.roles.{role}.principal: {:?} is not a valid user name \
                         (letters, digits, '_', '-', '.', at most 32, not starting with '-')",
                        r.principal
                    ));
                }
                roles.insert(role, r.principal);
            }
            targets.insert(name, Target { host: t.host, port: t.port.unwrap_or(22), roles });
        }
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }
        Ok(Policy { limits: Limits { cert_ttl_max, signer_rate, signer_window }, targets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_policy_loads() {
        let p = Policy::parse(DEV_POLICY, "dev.yaml").unwrap();
        assert!(!p.signer_principals().is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_with_location() {
        let e = Policy::parse("version: 1\ntargetz: {}\n", "p.yaml").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:2:1:") && e.contains("unknown field `targetz`"), "{e}");
        let e = Policy::parse(
            "version: 2\nlimits: {cert_ttl_max: 48h, signer_rate: 5}\ntargets: {w: {host: '', roles: {r: {principal: '-x'}}}}\n",
            "p.yaml",
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 5, "{e}");
    }
}
