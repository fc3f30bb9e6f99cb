//! Identifiers: ULIDs from the clock value the caller passes and 80 bits from the system CSPRNG
//! (ring; no second random-number crate).

use ring::rand::SecureRandom;
use ulid::Ulid;

use crate::time::UnixMicros;

/// A new ULID for the instant `now`.
pub fn new_ulid(now: UnixMicros) -> Ulid {
    let mut r = [0u8; 16];
    // If the CSPRNG fails the process has bigger problems; ids stay unique through the time part.
    let _ = ring::rand::SystemRandom::new().fill(&mut r[6..]);
    let ms = u64::try_from(now.0.max(0) / 1000).unwrap_or(0) & ((1 << 48) - 1);
    Ulid::from_parts(ms, u128::from_be_bytes(r) & ((1u128 << 80) - 1))
}
