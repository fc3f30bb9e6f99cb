//! Removing an injected credential from what comes back (pure).
//!
//! An upstream that echoes its request (an echo service, a debug endpoint, an error page quoting
//! the `Authorization` header) would hand the agent the very secret the broker holds for it.
//! Every form of the secret the broker sent (the raw value, the `Basic` base64 form, the
//! percent-encoded query form) is overwritten with `*` of the same length in response headers
//! and bodies, so lengths and framing do not change. Bodies are scrubbed while they stream: only
//! a tail that could be the start of a secret is held back until the next chunk (at the end of
//! an SSE event nothing is held), so token streams are not delayed.

/// Overwrites secrets in a stream of chunks. The forms and the held-back tail (which may be the
/// start of a secret) are zeroized when dropped and never printed.
#[derive(Default)]
pub struct Scrubber {
    needles: Vec<SecretBytes>,
    hold: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} forms [redacted], {} bytes held)", self.needles.len(), self.hold.len())
    }
}

impl Scrubber {
    /// A scrubber for these forms (empty ones are ignored).
    pub fn new(needles: Vec<Vec<u8>>) -> Self {
        let mut needles: Vec<SecretBytes> =
            needles.into_iter().filter(|n| !n.is_empty()).map(SecretBytes::new).collect();
        needles.sort_by(|a, b| a.expose().cmp(b.expose()));
        needles.dedup_by(|a, b| a.expose() == b.expose());
        Scrubber { needles, hold: Zeroizing::new(Vec::new()) }
    }

    /// Whether there is anything to scrub.
    pub fn is_active(&self) -> bool {
        !self.needles.is_empty()
    }

    /// Whether `text` contains a secret.
    pub fn contains(&self, text: &[u8]) -> bool {
        self.needles.iter().any(|n| find(text, n.expose(), 0).is_some())
    }

    /// Overwrites every secret in `buf`.
    pub fn scrub_all(&self, buf: &mut [u8]) {
        for n in &self.needles {
            let n = n.expose();
            let mut at = 0;
            while let Some(i) = find(buf, n, at) {
                buf[i..i + n.len()].fill(b'*');
                at = i + 1;
            }
        }
    }

    /// Takes the next chunk; returns what can be passed on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.hold.len() + chunk.len());
        buf.extend_from_slice(&self.hold);
        buf.extend_from_slice(chunk);
        self.hold.clear();
        self.scrub_all(&mut buf);
        let keep = self.partial_tail(&buf);
        self.hold.extend_from_slice(&buf[buf.len() - keep..]);
        buf.truncate(buf.len() - keep);
        buf
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let out = self.hold.to_vec();
        self.hold.clear();
        out
    }

    /// Length of the longest tail of `buf` that is a proper prefix of some secret.
    fn partial_tail(&self, buf: &[u8]) -> usize {
        let longest = self.needles.iter().map(SecretBytes::len).max().unwrap_or(0);
        let start = buf.len().saturating_sub(longest.saturating_sub(1));
        (start..buf.len())
            .find(|&i| {
                let tail = &buf[i..];
                self.needles.iter().any(|n| n.len() > tail.len() && n.expose().starts_with(tail))
            })
            .map_or(0, |i| buf.len() - i)
    }
}

use crate::secret::SecretBytes;
use zeroize::Zeroizing;

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let mut i = from;
    while i + needle.len() <= hay.len() {
        match hay[i..=hay.len() - needle.len()].iter().position(|b| *b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(s: &mut Scrubber, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn secrets_are_overwritten_across_chunk_boundaries() {
        let mut s = Scrubber::new(vec![b"sk-SECRET".to_vec(), b"c2stU0VDUkVU".to_vec()]);
        let out = run(&mut s, &[b"{\"auth\":\"Bearer sk-SE", b"CRET\",\"b\":\"c2stU0VDUkVU\"}"]);
        assert_eq!(out, b"{\"auth\":\"Bearer *********\",\"b\":\"************\"}");
        assert!(s.contains(b"x sk-SECRET y") && !s.contains(b"sk-SECRE"));
    }

    #[test]
    fn nothing_is_held_at_an_event_boundary() {
        let mut s = Scrubber::new(vec![b"sk-SECRET".to_vec()]);
        assert_eq!(s.push(b"data: hello\n\n"), b"data: hello\n\n");
        assert_eq!(s.push(b"data: s"), b"data: ", "a possible start is held");
        assert_eq!(s.push(b"ky\n\n"), b"sky\n\n");
        assert!(s.finish().is_empty());
        let mut off = Scrubber::new(vec![]);
        assert!(!off.is_active());
        assert_eq!(off.push(b"anything"), b"anything");
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_result(
            parts in proptest::collection::vec(proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'k'), Just(b'-')], 0..12), 0..10),
        ) {
            let needles = vec![b"ab-k".to_vec(), b"kk".to_vec()];
            let whole: Vec<u8> = parts.concat();
            let mut expect = whole.clone();
            Scrubber::new(needles.clone()).scrub_all(&mut expect);
            let chunks: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let got = run(&mut Scrubber::new(needles.clone()), &chunks);
            prop_assert_eq!(&got, &expect);
            prop_assert!(!Scrubber::new(needles).contains(&got));
        }
    }
}
