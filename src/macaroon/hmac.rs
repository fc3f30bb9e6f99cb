//! HMAC-SHA256 for the macaroon chain, built on the SHA-256 compression function.
//!
//! Every chain step is `sig_i = HMAC(key = sig_{i-1}, caveat_i)` with a new 32-byte key, so no
//! precomputation across steps is possible: a step is four compressions (ipad, message, opad,
//! inner digest). Driving `sha2::compress256` (SHA-NI where the CPU has it) directly costs about
//! 237 ns per step on the reference VM versus about 400 ns through `ring::hmac` with a fresh key per
//! step (docs/decisions/0005-macaroon-hmac.md). Tests check every output against ring.

use sha2::compress256;
use sha2::digest::generic_array::GenericArray;

const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

fn block(bytes: &[u8]) -> &GenericArray<u8, sha2::digest::consts::U64> {
    GenericArray::from_slice(bytes)
}

fn state_bytes(st: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (chunk, w) in out.chunks_exact_mut(4).zip(st) {
        chunk.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// Hashes `tail` (and its padding) onto `st`, where `prefix_len` bytes were already absorbed.
fn finish(st: &mut [u32; 8], prefix_len: usize, msg: &[u8]) {
    let mut rest = msg;
    while rest.len() >= 64 {
        compress256(st, std::slice::from_ref(block(&rest[..64])));
        rest = &rest[64..];
    }
    let total_bits = ((prefix_len + msg.len()) as u64) * 8;
    let mut buf = [0u8; 128];
    buf[..rest.len()].copy_from_slice(rest);
    buf[rest.len()] = 0x80;
    let n = if rest.len() + 9 <= 64 { 64 } else { 128 };
    buf[n - 8..n].copy_from_slice(&total_bits.to_be_bytes());
    for b in buf[..n].chunks_exact(64) {
        compress256(st, std::slice::from_ref(block(b)));
    }
}

/// HMAC-SHA256 with a key of at most 64 bytes.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    debug_assert!(key.len() <= 64, "longer keys are hashed first; we never use them");
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate().take(64) {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = IV;
    compress256(&mut inner, std::slice::from_ref(block(&ipad)));
    finish(&mut inner, 64, msg);
    let mut outer = IV;
    compress256(&mut outer, std::slice::from_ref(block(&opad)));
    // The outer message is the 32-byte inner digest: one block with fixed padding
    // (0x80, zeros, and the bit length of 64 + 32 bytes).
    let mut last = [0u8; 64];
    last[..32].copy_from_slice(&state_bytes(&inner));
    last[32] = 0x80;
    last[56..].copy_from_slice(&(96u64 * 8).to_be_bytes());
    compress256(&mut outer, std::slice::from_ref(block(&last)));
    // The pads are not zeroized: in the chain the key is the previous signature, which lives on
    // the stack anyway, and scrubbing 128 bytes per step costs a third of a step.
    state_bytes(&outer)
}

/// SHA-256 of a 32-byte value (one compression): used to store lineage bindings without storing
/// the chain signatures themselves.
pub fn sha256_32(data: &[u8; 32]) -> [u8; 32] {
    let mut st = IV;
    finish(&mut st, 0, data);
    state_bytes(&st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring_hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), msg).as_ref().to_vec()
    }

    #[test]
    fn matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            data_encoding::HEXLOWER.encode(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn matches_ring_at_every_padding_boundary() {
        for len in 0..200 {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for klen in [0usize, 1, 23, 32, 63, 64] {
                let key: Vec<u8> = (0..klen).map(|i| (i * 7) as u8).collect();
                assert_eq!(hmac_sha256(&key, &msg).to_vec(), ring_hmac(&key, &msg), "len {len} klen {klen}");
            }
        }
    }

    #[test]
    fn sha256_32_matches_ring() {
        let d = [0xabu8; 32];
        assert_eq!(sha256_32(&d).to_vec(), ring::digest::digest(&ring::digest::SHA256, &d).as_ref().to_vec());
    }

    proptest! {
        #[test]
        fn matches_ring(key in proptest::collection::vec(any::<u8>(), 0..=64), msg in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert_eq!(hmac_sha256(&key, &msg).to_vec(), ring_hmac(&key, &msg));
        }
    }
}
