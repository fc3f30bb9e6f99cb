//! OpenSSH key revocation lists (KRL), the binary format sshd reads from `RevokedKeys`
//! (OpenSSH's `PROTOCOL.krl`). Pure: values in, bytes out.
//!
//! We write one certificates section scoped to our CA, with a serial list: exactly the
//! certificates of revoked tasks (and those revoked by an operator) that have not yet expired.
//! An expired certificate needs no entry: sshd refuses it on its validity window.

const MAGIC: &[u8; 8] = b"SSHKRL\n\0";
const FORMAT_VERSION: u32 = 1;
const SECTION_CERTIFICATES: u8 = 1;
const CERT_SERIAL_LIST: u8 = 0x20;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s);
}

/// A KRL revoking `serials` of certificates signed by the CA whose public key blob (SSH wire
/// form) is `ca_blob`. `version` must grow with every change (sshd does not use it; `ssh-keygen
/// -Q -l` shows it); `generated` is Unix seconds.
pub fn encode(ca_blob: &[u8], serials: &[u64], version: u64, generated: u64, comment: &str) -> Vec<u8> {
    let mut sorted = serials.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::with_capacity(64 + ca_blob.len() + 8 * sorted.len());
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, FORMAT_VERSION);
    put_u64(&mut out, version);
    put_u64(&mut out, generated);
    put_u64(&mut out, 0); // flags
    put_string(&mut out, b""); // reserved
    put_string(&mut out, comment.as_bytes());
    if !sorted.is_empty() {
        let mut list = Vec::with_capacity(8 * sorted.len());
        for s in &sorted {
            put_u64(&mut list, *s);
        }
        let mut section = Vec::new();
        put_string(&mut section, ca_blob);
        put_string(&mut section, b""); // reserved
        section.push(CERT_SERIAL_LIST);
        put_string(&mut section, &list);
        out.push(SECTION_CERTIFICATES);
        put_string(&mut out, &section);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_protocol_krl() {
        let k = encode(b"CA", &[7, 3, 7], 9, 1_700_000_000, "c");
        assert_eq!(&k[..8], MAGIC);
        assert_eq!(&k[8..12], &1u32.to_be_bytes());
        assert_eq!(&k[12..20], &9u64.to_be_bytes());
        assert_eq!(&k[20..28], &1_700_000_000u64.to_be_bytes());
        assert_eq!(&k[28..36], &0u64.to_be_bytes());
        assert_eq!(&k[36..40], &0u32.to_be_bytes());
        assert_eq!(&k[40..45], &[0, 0, 0, 1, b'c']);
        assert_eq!(k[45], SECTION_CERTIFICATES);
        // section: string("CA") + string("") + 0x20 + string(2 serials, sorted, deduplicated)
        let sec = &k[50..];
        assert_eq!(u32::from_be_bytes(k[46..50].try_into().unwrap()) as usize, sec.len());
        assert_eq!(&sec[..6], &[0, 0, 0, 2, b'C', b'A']);
        assert_eq!(&sec[6..10], &[0, 0, 0, 0]);
        assert_eq!(sec[10], CERT_SERIAL_LIST);
        assert_eq!(&sec[11..15], &16u32.to_be_bytes());
        assert_eq!(&sec[15..23], &3u64.to_be_bytes());
        assert_eq!(&sec[23..31], &7u64.to_be_bytes());
    }

    #[test]
    fn an_empty_list_has_no_section() {
        let k = encode(b"CA", &[], 1, 0, "");
        assert_eq!(k.len(), 44);
    }
}
