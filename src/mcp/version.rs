//! MCP protocol revisions and their two eras.
//!
//! The **session era** (2024-11-05 to 2025-11-25) opens with `initialize`, which negotiates a
//! version and (over HTTP) a session. The **stateless era** (2026-07-28) has no handshake: every
//! request names its version in `params._meta` and in the `MCP-Protocol-Version` header, and a
//! version we do not serve is answered with `-32022` and the list we do.

use std::fmt;

/// A protocol revision this server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// 2024-11-05 (accepted at `initialize`; its HTTP+SSE transport is not offered).
    V2024_11_05,
    /// 2025-03-26: Streamable HTTP, tool annotations.
    V2025_03_26,
    /// 2025-06-18: `MCP-Protocol-Version` header, structured output, no batches.
    V2025_06_18,
    /// 2025-11-25: 403 on a bad Origin, icons, tasks (experimental).
    V2025_11_25,
    /// 2026-07-28: stateless, `server/discover`, `resultType`, routing headers.
    V2026_07_28,
}

/// Which way a revision negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Era {
    /// `initialize` + `Mcp-Session-Id`.
    Session,
    /// Per-request `_meta`, no sessions.
    Stateless,
}

/// Session-era revisions, oldest first.
pub const SESSION_VERSIONS: [Version; 4] =
    [Version::V2024_11_05, Version::V2025_03_26, Version::V2025_06_18, Version::V2025_11_25];

/// Stateless-era revisions, oldest first.
pub const STATELESS_VERSIONS: [Version; 1] = [Version::V2026_07_28];

/// What `initialize` offers when the client asks for something else.
pub const LATEST_SESSION: Version = Version::V2025_11_25;

/// `_meta` key carrying the protocol version (stateless era).
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key carrying the client's capabilities (stateless era).
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key carrying the client's name and version (stateless era).
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key carrying the server's name and version on results (stateless era).
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
/// `_meta` key naming the subscription a notification belongs to (stateless era).
pub const META_SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

impl Version {
    /// Tools may declare an `outputSchema` and results carry `structuredContent` (2025-06-18 on).
    pub fn structured_output(self) -> bool {
        self >= Version::V2025_06_18
    }

    /// Parses a revision string; `None` for anything we do not speak.
    pub fn parse(s: &str) -> Option<Version> {
        Some(match s {
            "2024-11-05" => Version::V2024_11_05,
            "2025-03-26" => Version::V2025_03_26,
            "2025-06-18" => Version::V2025_06_18,
            "2025-11-25" => Version::V2025_11_25,
            "2026-07-28" => Version::V2026_07_28,
            _ => return None,
        })
    }

    /// The revision string.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V2024_11_05 => "2024-11-05",
            Version::V2025_03_26 => "2025-03-26",
            Version::V2025_06_18 => "2025-06-18",
            Version::V2025_11_25 => "2025-11-25",
            Version::V2026_07_28 => "2026-07-28",
        }
    }

    /// Its era.
    pub fn era(self) -> Era {
        if self >= Version::V2026_07_28 { Era::Stateless } else { Era::Session }
    }

    /// The version `initialize` answers for a client asking for `requested`: the same one when
    /// we speak it in the session era, else our latest session-era version (the spec's rule; the
    /// client then decides whether it can continue).
    pub fn negotiate(requested: &str) -> Version {
        match Version::parse(requested) {
            Some(v) if v.era() == Era::Session => v,
            _ => LATEST_SESSION,
        }
    }

    /// Resource-not-found error code in this revision (`-32002` until 2026-07-28 made it
    /// `-32602`).
    pub fn resource_not_found_code(self) -> i64 {
        if self.era() == Era::Stateless {
            super::jsonrpc::code::INVALID_PARAMS
        } else {
            super::jsonrpc::code::RESOURCE_NOT_FOUND
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eras_and_negotiation() {
        for v in SESSION_VERSIONS {
            assert_eq!(v.era(), Era::Session);
            assert_eq!(Version::parse(v.as_str()), Some(v));
            assert_eq!(Version::negotiate(v.as_str()), v);
        }
        assert_eq!(Version::V2026_07_28.era(), Era::Stateless);
        assert_eq!(Version::negotiate("2026-07-28"), LATEST_SESSION, "initialize cannot reach the stateless era");
        assert_eq!(Version::negotiate("1999-01-01"), LATEST_SESSION);
        assert_eq!(Version::parse("2025-11-25 "), None);
    }
}
