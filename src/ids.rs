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

/// Monotonic ULIDs for one thread's stream of events (the audit log): 80 random bits drawn once
/// per millisecond, incremented for each further id in that millisecond, so ids stay unique and
/// sorted without a system call per id.
#[derive(Debug, Default)]
pub struct Monotonic {
    last: std::cell::Cell<(u64, u128)>,
}

impl Monotonic {
    /// The next id for the instant `now` (never smaller than the previous one).
    pub fn next(&self, now: UnixMicros) -> Ulid {
        let ms = u64::try_from(now.0.max(0) / 1000).unwrap_or(0) & ((1 << 48) - 1);
        let (last_ms, last_rand) = self.last.get();
        let mask = (1u128 << 80) - 1;
        let (ms, rand) = if ms <= last_ms && last_rand < mask {
            (last_ms, last_rand + 1)
        } else {
            let fresh = new_ulid(UnixMicros(ms as i64 * 1000));
            // Leave room below the top so a burst within one millisecond can count up.
            (ms.max(last_ms), fresh.random() & (mask >> 1))
        };
        self.last.set((ms, rand));
        Ulid::from_parts(ms, rand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_ids_increase_within_and_across_milliseconds() {
        let m = Monotonic::default();
        let t = UnixMicros(1_700_000_000_000_000);
        let a = m.next(t);
        let b = m.next(t);
        let c = m.next(UnixMicros(t.0 + 5_000));
        let d = m.next(UnixMicros(t.0 - 10_000));
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(b.random(), a.random() + 1);
    }
}
