//! A task and the journal's records: what is written to `state/tasks.journal` and read back at
//! start, with the text forms of keys and ids. Pure data.

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::time::UnixMicros;

/// Seal context for a tree's root key.
pub fn seal_context(root: Ulid) -> String {
    format!("ephyr-task-root:{root}")
}

/// Who must prove possession for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nobody: a bearer token (the agent's policy does not require a holder key).
    Bearer,
    /// Requests must be signed by this Ed25519 key (the task's own, or inherited).
    Key([u8; 32]),
    /// A holder key is required but not bound yet: only `task_bind` is served until `deadline`.
    AwaitingBind {
        /// When the task becomes unusable for good.
        deadline: UnixMicros,
    },
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(v))
    }
    pub fn deserialize<'d, D: Deserializer<'d>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("expected 32 bytes of hex"))
    }
}

/// A ULID as its text in JSON records (the task, run and key journals).
pub mod ulid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use ulid::Ulid;
    /// Writes the text.
    pub fn serialize<S: Serializer>(v: &Ulid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    /// Reads the text.
    pub fn deserialize<'d, D: Deserializer<'d>>(d: D) -> Result<Ulid, D::Error> {
        Ulid::from_string(&String::deserialize(d)?).map_err(|_| serde::de::Error::custom("expected a ULID"))
    }
    /// An optional ULID.
    pub mod opt {
        use super::*;
        /// Writes the text or null.
        pub fn serialize<S: Serializer>(v: &Option<Ulid>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(u) => s.serialize_some(&u.to_string()),
                None => s.serialize_none(),
            }
        }
        /// Reads the text or null.
        pub fn deserialize<'d, D: Deserializer<'d>>(d: D) -> Result<Option<Ulid>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(t) => Ulid::from_string(&t).map(Some).map_err(|_| serde::de::Error::custom("expected a ULID")),
            }
        }
    }
}

mod key32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(k) => s.serialize_some(&data_encoding::BASE64URL_NOPAD.encode(k)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'d, D: Deserializer<'d>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_holder_key(&s).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a holder public key: 32 bytes, base64url without padding (Go Ephyr's form).
pub fn parse_holder_key(s: &str) -> Result<[u8; 32], String> {
    BASE64URL_NOPAD
        .decode(s.trim().as_bytes())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| "holder_pub_key must be a 32-byte Ed25519 public key, base64url without padding".to_string())
}

/// One task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    /// Its id.
    #[serde(with = "ulid_text")]
    pub id: Ulid,
    /// Its tree's root task.
    #[serde(with = "ulid_text")]
    pub root: Ulid,
    /// Its parent (none for a root).
    #[serde(with = "ulid_text::opt")]
    pub parent: Option<Ulid>,
    /// The agent that holds it.
    pub agent: String,
    /// The agent that delegated it, when that is another agent (a hand-off).
    pub delegated_by: Option<String>,
    /// What it is for.
    pub description: String,
    /// 0 for a root.
    pub depth: u8,
    /// Who started the tree (`agent:<name>` or `uid:<n>`).
    pub initiated_by: String,
    /// Created (µs).
    pub created: i64,
    /// Expires (µs, whole seconds).
    pub expires: i64,
    /// Whether its token allows delegation.
    pub can_delegate: bool,
    /// The caveats appended when its token was minted, its `task =` caveat last.
    pub caveats: Vec<String>,
    /// SHA-256 of the chain signature right after its `task =` caveat.
    #[serde(with = "hex32")]
    pub binding: [u8; 32],
    /// Its own holder key.
    #[serde(with = "key32", default)]
    pub holder_key: Option<[u8; 32]>,
    /// A holder key must be bound by then (µs), if the task awaits one.
    pub bind_deadline: Option<i64>,
    /// When it was bound (µs).
    pub bound_at: Option<i64>,
    /// Its watermark: revoked at (µs). Every token naming it, or a descendant, is dead.
    pub revoked_at: Option<i64>,
    /// The reduced envelope of its minted token (for display).
    pub envelope: serde_json::Value,
}

impl Task {
    /// Expiry.
    pub fn expires_at(&self) -> UnixMicros {
        UnixMicros(self.expires)
    }
}

/// Journal records.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// A new tree and its sealed root key.
    Tree {
        /// Root task.
        #[serde(with = "ulid_text")]
        root: Ulid,
        /// Sealed root key (standard base64).
        sealed: String,
        /// The root task's expiry (µs): the key is dropped after it.
        expires: i64,
    },
    /// A new task.
    Task(Box<Task>),
    /// A holder key bound to a task.
    Bind {
        /// The task.
        #[serde(with = "ulid_text")]
        task: Ulid,
        /// The key (base64url).
        key: String,
        /// When (µs).
        at: i64,
    },
    /// A revocation watermark.
    Revoke {
        /// The task.
        #[serde(with = "ulid_text")]
        task: Ulid,
        /// When (µs).
        at: i64,
    },
    /// A consumed proof nonce (hashed), remembered until `until` (µs).
    Nonce {
        /// Hex of the 16-byte replay key.
        key: String,
        /// Expiry (µs).
        until: i64,
    },
    /// A span of proof windows whose nonces were forgotten (pop::ReplayCache): written at
    /// compaction, so a clock that goes back across a restart reopens none of them.
    NonceForgotten {
        /// First window end in the span (µs).
        first: i64,
        /// Last window end in the span (µs).
        last: i64,
    },
}

impl Record {
    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
