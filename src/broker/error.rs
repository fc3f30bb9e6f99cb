//! The broker's one error type at its module boundaries (SSH, the proxy, tasks, operations), and
//! its three mappings: to a tool result (`tools::Output::failed`), to HTTP ([`Error::status`] and
//! [`Error::code`] in a JSON body), and to an audit code ([`Error::code`]).
//!
//! What runs here: nothing; pure values.

use http::StatusCode;

use super::policy::Denial;

/// Why something the broker was asked to do did not happen (or happened without its record).
/// Every variant carries the text the caller sees; none carries a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// `authorize` said no (policy, token, network rules). The caller should not retry the same
    /// request: the reason says what would have to change. HTTP 403; tools: `denied (code): …`.
    Denied(Denial),
    /// An operator must approve this exact action first (`approvals:`): request `id` waits.
    /// Retry the same call once approved. HTTP 403; tools: `approval pending (approval_pending): …`.
    Pending {
        /// The approval request.
        id: String,
        /// What is awaited, from whom, until when, and how to retry.
        message: String,
    },
    /// The request is malformed (a path, a header, an argument). Fix the request. HTTP 400.
    Invalid(String),
    /// Nothing to act on: no such live task, certificate or session for this caller. HTTP 404.
    NotFound(String),
    /// Refused as it stands: a limit is reached (certificates held), or it contradicts the state
    /// (already revoked, a TTL beyond the parent's). Retry later or change the request. HTTP 409.
    Refused(String),
    /// The request body is larger than allowed. HTTP 413.
    TooLarge(String),
    /// The signer refused or could not answer (its own limits, rate, or it restarted). Nothing
    /// was issued; retry shortly. HTTP 503.
    Signer(String),
    /// An upstream (an HTTP service, an SSH host) could not be reached or answered badly; `code`
    /// names how (`upstream_failed`, `host_unreachable`, `host_key_mismatch`, ...). HTTP 502.
    Upstream {
        /// Stable code.
        code: &'static str,
        /// What happened.
        message: String,
    },
    /// An upstream did not answer in time. HTTP 504.
    Timeout(String),
    /// The broker cannot act now: the audit trail or the state cannot be written, a secret is
    /// missing. If the act took effect anyway (a revocation whose record failed), the text says
    /// so. HTTP 503.
    Unavailable(String),
}

impl Error {
    /// An upstream failure with the generic code.
    pub fn upstream(message: impl Into<String>) -> Error {
        Error::Upstream { code: "upstream_failed", message: message.into() }
    }

    /// The audit trail failed: nothing is done without a record.
    pub fn audit(reason: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("audit unavailable, refusing to act: {reason}"))
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Denied(_) | Error::Pending { .. } => StatusCode::FORBIDDEN,
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Refused(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Signer(_) | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable code (HTTP bodies, metrics, audit records).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Denied(d) => d.code.as_str(),
            Error::Pending { .. } => "approval_pending",
            Error::Invalid(_) => "invalid_request",
            Error::NotFound(_) => "not_found",
            Error::Refused(_) => "refused",
            Error::TooLarge(_) => "body_too_large",
            Error::Signer(_) => "signer_refused",
            Error::Upstream { code, .. } => code,
            Error::Timeout(_) => "upstream_timeout",
            Error::Unavailable(_) => "unavailable",
        }
    }

    /// The text for the caller (a denial's reason alone; [`std::fmt::Display`] adds its code).
    pub fn message(&self) -> String {
        match self {
            Error::Denied(d) => d.reason.clone(),
            Error::Upstream { message, .. } | Error::Pending { message, .. } => message.clone(),
            Error::Invalid(m)
            | Error::NotFound(m)
            | Error::Refused(m)
            | Error::TooLarge(m)
            | Error::Signer(m)
            | Error::Timeout(m)
            | Error::Unavailable(m) => m.clone(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Denied(d) => write!(f, "denied ({}): {}", d.code.as_str(), d.reason),
            Error::Pending { message, .. } => write!(f, "approval pending (approval_pending): {message}"),
            other => f.write_str(&other.message()),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::policy::DenyCode;

    #[test]
    fn each_variant_maps_to_a_status_a_code_and_a_text() {
        let d = Error::Denied(Denial { code: DenyCode::PolicyDeniesTarget, reason: "no grant".into() });
        assert_eq!((d.status(), d.code()), (StatusCode::FORBIDDEN, "policy_denies_target"));
        assert_eq!(d.to_string(), "denied (policy_denies_target): no grant");
        assert_eq!(d.message(), "no grant");
        let u = Error::Upstream { code: "host_key_mismatch", message: "presented X".into() };
        assert_eq!((u.status(), u.code()), (StatusCode::BAD_GATEWAY, "host_key_mismatch"));
        assert_eq!(Error::upstream("x").code(), "upstream_failed");
        let a = Error::audit("disk full");
        assert_eq!((a.status(), a.code()), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
        assert_eq!(a.to_string(), "audit unavailable, refusing to act: disk full");
        for (e, s) in [
            (Error::Invalid("m".into()), 400),
            (Error::NotFound("m".into()), 404),
            (Error::Refused("m".into()), 409),
            (Error::TooLarge("m".into()), 413),
            (Error::Signer("m".into()), 503),
            (Error::Timeout("m".into()), 504),
        ] {
            assert_eq!(e.status().as_u16(), s, "{e:?}");
            assert_eq!(e.to_string(), "m");
        }
    }
}
