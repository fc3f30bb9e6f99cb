//! Task tokens: libmacaroons-compatible V2 macaroons with ephyr's caveat language.
//!
//! Pure: no I/O and no clock (callers pass `now`). Layers, each usable on its own:
//!
//! - [`wire`]: the V2 binary format and the `mac_` + base64url text form (strict decoder);
//! - [`chain`]: root keys, minting, offline attenuation, verification (HMAC-SHA256 chain with
//!   libmacaroons' key derivation, so pymacaroons and libmacaroons can verify and attenuate our
//!   tokens given the root key);
//! - [`caveat`]: the caveat grammar;
//! - [`envelope`]: the reducer, from caveats to an [`Envelope`] + lineage + metadata.
//!
//! DESIGN.md §4 is the contract: appending a caveat can only narrow (property-tested below), the
//! identifier is the root task ULID, and every token names its task with a MACed `task =` caveat.

pub(crate) mod caveat;
pub(crate) mod chain;
pub(crate) mod envelope;
mod hmac;
pub(crate) mod wire;

pub use caveat::{ArgConstraint, Caveat, SetKey};
pub use chain::{ChainStart, RootKey, VerifyError, attenuate};
pub use envelope::{Dim, Envelope, LineageEntry, Reduced, reduce};
pub use wire::{DecodeError, Macaroon};

/// Location hint written into ephyr tokens (informational; not covered by the signature).
pub const LOCATION: &str = "ephyr";

#[cfg(test)]
mod tests;
