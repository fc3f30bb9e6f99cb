//! libmacaroons V2 binary format, and its text form `mac_` + base64url (no padding).
//!
//! ```text
//! macaroon = 0x02 [LOCATION] IDENTIFIER EOS { [LOCATION] IDENTIFIER [VID] EOS } EOS SIGNATURE
//! field    = type:varint length:varint bytes       EOS = 0x00 (no length)
//! types    : LOCATION=1  IDENTIFIER=2  VID=4  SIGNATURE=6 (exactly 32 bytes)
//! ```
//!
//! Decoding is strict: version 2 only, fields in grammar order, no duplicates, no unknown types,
//! minimal varints, bounded lengths and counts, nothing after the signature. A third-party caveat
//! (one with a location or a verification id) decodes, then is rejected: they are reserved.
//! The whole token is held in one buffer; fields are spans into it.

use std::fmt;
use std::ops::Range;

use data_encoding::BASE64URL_NOPAD;

/// Text prefix of every ephyr token.
pub const PREFIX: &str = "mac_";
/// Largest accepted token, counted on the encoded text (`mac_...`).
pub const MAX_ENCODED_LEN: usize = 8192;
/// Most caveats in one token.
pub const MAX_CAVEATS: usize = 64;
/// Longest identifier or caveat.
pub const MAX_FIELD_LEN: usize = 1024;
/// Longest location hint.
pub const MAX_LOCATION_LEN: usize = 256;

const VERSION: u8 = 2;
const EOS: u8 = 0;
const LOCATION: u8 = 1;
const IDENTIFIER: u8 = 2;
const VID: u8 = 4;
const SIGNATURE: u8 = 6;

/// Why bytes are not a token we accept. Every variant is a client error: the token is malformed,
/// not merely unauthorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The text does not start with `mac_`.
    MissingPrefix,
    /// Longer than [`MAX_ENCODED_LEN`].
    TooLarge(usize),
    /// Not canonical unpadded base64url.
    Base64,
    /// The first byte is not 2 (a V1 text macaroon or something else).
    UnsupportedVersion(u8),
    /// The input ends inside a field.
    Truncated,
    /// A length or type is not a minimal LEB128 varint that fits.
    BadVarint,
    /// A field type this format does not define.
    UnknownField(u64),
    /// A field appears where the grammar does not allow it (duplicate or out of order).
    UnexpectedField {
        /// The field type found.
        field: &'static str,
        /// Where (`header` or `caveat N`).
        section: String,
    },
    /// An identifier, location or caveat is empty or longer than its limit.
    BadFieldLength {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// More than [`MAX_CAVEATS`] caveats.
    TooManyCaveats,
    /// The signature is not 32 bytes.
    BadSignatureLength(usize),
    /// Bytes after the signature.
    TrailingBytes(usize),
    /// A third-party caveat: decoded, but reserved and not accepted.
    ThirdPartyCaveat {
        /// Its position (0-based).
        index: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingPrefix => write!(f, "a token starts with {PREFIX:?}"),
            Self::TooLarge(n) => write!(f, "token is {n} bytes; the limit is {MAX_ENCODED_LEN}"),
            Self::Base64 => f.write_str("token is not unpadded base64url after 'mac_'"),
            Self::UnsupportedVersion(v) => {
                write!(f, "unsupported macaroon format version byte {v:#04x} (only V2 binary)")
            }
            Self::Truncated => f.write_str("token is truncated"),
            Self::BadVarint => f.write_str("malformed length or field type (varint)"),
            Self::UnknownField(t) => write!(f, "unknown field type {t}"),
            Self::UnexpectedField { field, section } => write!(f, "unexpected {field} field in the {section}"),
            Self::BadFieldLength { field, len } => write!(f, "{field} has a bad length ({len} bytes)"),
            Self::TooManyCaveats => write!(f, "more than {MAX_CAVEATS} caveats"),
            Self::BadSignatureLength(n) => write!(f, "signature is {n} bytes, not 32"),
            Self::TrailingBytes(n) => write!(f, "{n} trailing bytes after the signature"),
            Self::ThirdPartyCaveat { index } => {
                write!(f, "caveat {index} is a third-party caveat; they are reserved and not accepted")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A decoded token: one buffer, spans into it.
#[derive(Clone, PartialEq, Eq)]
pub struct Macaroon {
    buf: Vec<u8>,
    location: Option<Range<usize>>,
    identifier: Range<usize>,
    caveats: Vec<Range<usize>>,
    signature: [u8; 32],
}

impl fmt::Debug for Macaroon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The signature is a bearer credential for this token (and a key for attenuating it).
        f.debug_struct("Macaroon")
            .field("identifier", &String::from_utf8_lossy(self.identifier()))
            .field("caveats", &self.caveats().map(String::from_utf8_lossy).collect::<Vec<_>>())
            .field("signature", &"[redacted]")
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// Unsigned LEB128, minimal encoding, at most 32 bits.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for i in 0..5 {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(DecodeError::BadVarint); // non-minimal
                }
                return if value <= u64::from(u32::MAX) { Ok(value) } else { Err(DecodeError::BadVarint) };
            }
        }
        Err(DecodeError::BadVarint)
    }

    /// Reads a field's length and returns its span.
    fn span(&mut self, field: &'static str, max: usize) -> Result<Range<usize>, DecodeError> {
        let len = self.varint()? as usize;
        if len > self.buf.len() - self.pos {
            return Err(DecodeError::Truncated);
        }
        if len == 0 || len > max {
            return Err(DecodeError::BadFieldLength { field, len });
        }
        let start = self.pos;
        self.pos += len;
        Ok(start..start + len)
    }
}

fn field_name(t: u64) -> &'static str {
    match t {
        0 => "end-of-section",
        1 => "location",
        2 => "identifier",
        4 => "verification-id",
        6 => "signature",
        _ => "unknown",
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn push_field(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    out.push(kind);
    push_varint(out, data.len());
    out.extend_from_slice(data);
}

impl Macaroon {
    /// Decodes the text form `mac_<base64url>`.
    pub fn decode(text: &str) -> Result<Macaroon, DecodeError> {
        if text.len() > MAX_ENCODED_LEN {
            return Err(DecodeError::TooLarge(text.len()));
        }
        let b64 = text.strip_prefix(PREFIX).ok_or(DecodeError::MissingPrefix)?;
        let bin = BASE64URL_NOPAD.decode(b64.as_bytes()).map_err(|_| DecodeError::Base64)?;
        Macaroon::decode_binary(bin)
    }

    /// Decodes V2 binary.
    pub fn decode_binary(buf: Vec<u8>) -> Result<Macaroon, DecodeError> {
        if buf.len() > MAX_ENCODED_LEN {
            return Err(DecodeError::TooLarge(buf.len()));
        }
        let mut c = Cursor { buf: &buf, pos: 0 };
        let v = c.byte()?;
        if v != VERSION {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        // Header: [LOCATION] IDENTIFIER EOS
        let mut location = None;
        let mut t = c.varint()?;
        if t == u64::from(LOCATION) {
            location = Some(c.span("location", MAX_LOCATION_LEN)?);
            t = c.varint()?;
        }
        if t != u64::from(IDENTIFIER) {
            return Err(unexpected(t, "header".into()));
        }
        let identifier = c.span("identifier", MAX_FIELD_LEN)?;
        let t = c.varint()?;
        if t != u64::from(EOS) {
            return Err(unexpected(t, "header".into()));
        }
        // Caveat sections until an empty one.
        let mut caveats = Vec::new();
        let mut third_party = None;
        loop {
            let mut t = c.varint()?;
            if t == u64::from(EOS) {
                break;
            }
            let index = caveats.len();
            if index == MAX_CAVEATS {
                return Err(DecodeError::TooManyCaveats);
            }
            let section = || format!("caveat {index}");
            let mut is_third_party = false;
            if t == u64::from(LOCATION) {
                c.span("location", MAX_LOCATION_LEN)?;
                is_third_party = true;
                t = c.varint()?;
            }
            if t != u64::from(IDENTIFIER) {
                return Err(unexpected(t, section()));
            }
            let id = c.span("caveat", MAX_FIELD_LEN)?;
            t = c.varint()?;
            if t == u64::from(VID) {
                c.span("verification-id", MAX_FIELD_LEN)?;
                is_third_party = true;
                t = c.varint()?;
            }
            if t != u64::from(EOS) {
                return Err(unexpected(t, section()));
            }
            if is_third_party && third_party.is_none() {
                third_party = Some(index);
            }
            caveats.push(id);
        }
        let t = c.varint()?;
        if t != u64::from(SIGNATURE) {
            return Err(unexpected(t, "trailer".into()));
        }
        let len = c.varint()? as usize;
        if len != 32 {
            return Err(DecodeError::BadSignatureLength(len));
        }
        if c.buf.len() - c.pos < 32 {
            return Err(DecodeError::Truncated);
        }
        let signature: [u8; 32] = c.buf[c.pos..c.pos + 32].try_into().expect("32 bytes");
        c.pos += 32;
        if c.pos != c.buf.len() {
            return Err(DecodeError::TrailingBytes(c.buf.len() - c.pos));
        }
        if let Some(index) = third_party {
            return Err(DecodeError::ThirdPartyCaveat { index });
        }
        Ok(Macaroon { buf, location, identifier, caveats, signature })
    }

    /// Builds a token from its parts (used by minting and attenuation).
    pub(crate) fn from_parts(location: &[u8], identifier: &[u8], caveats: &[&[u8]], signature: [u8; 32]) -> Macaroon {
        let mut buf = Vec::with_capacity(
            40 + location.len() + identifier.len() + caveats.iter().map(|c| c.len() + 4).sum::<usize>(),
        );
        buf.push(VERSION);
        let loc = if location.is_empty() {
            None
        } else {
            push_field(&mut buf, LOCATION, location);
            Some(buf.len() - location.len()..buf.len())
        };
        push_field(&mut buf, IDENTIFIER, identifier);
        let id = buf.len() - identifier.len()..buf.len();
        buf.push(EOS);
        let mut spans = Vec::with_capacity(caveats.len() + 1);
        for cav in caveats {
            push_field(&mut buf, IDENTIFIER, cav);
            spans.push(buf.len() - cav.len()..buf.len());
            buf.push(EOS);
        }
        buf.push(EOS);
        push_field(&mut buf, SIGNATURE, &signature);
        Macaroon { buf, location: loc, identifier: id, caveats: spans, signature }
    }

    /// Appends a first-party caveat whose new chain signature is `signature`.
    pub(crate) fn with_caveat(&self, caveat: &[u8], signature: [u8; 32]) -> Macaroon {
        let mut caveats: Vec<&[u8]> = self.caveats().collect();
        caveats.push(caveat);
        Macaroon::from_parts(self.location().unwrap_or(b""), self.identifier(), &caveats, signature)
    }

    /// V2 binary.
    pub fn to_binary(&self) -> &[u8] {
        &self.buf
    }

    /// Text form `mac_<base64url>`.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(PREFIX.len() + BASE64URL_NOPAD.encode_len(self.buf.len()));
        s.push_str(PREFIX);
        BASE64URL_NOPAD.encode_append(&self.buf, &mut s);
        s
    }

    /// The identifier (for ephyr tokens: the root task ULID).
    pub fn identifier(&self) -> &[u8] {
        &self.buf[self.identifier.clone()]
    }

    /// The location hint, if any (not covered by the signature).
    pub fn location(&self) -> Option<&[u8]> {
        self.location.clone().map(|r| &self.buf[r])
    }

    /// First-party caveats in order.
    pub fn caveats(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.caveats.iter().map(|r| &self.buf[r.clone()])
    }

    /// Number of caveats.
    pub fn caveat_count(&self) -> usize {
        self.caveats.len()
    }

    /// The chain signature (a bearer secret: it lets anyone attenuate this token).
    pub fn signature(&self) -> &[u8; 32] {
        &self.signature
    }
}

fn unexpected(t: u64, section: String) -> DecodeError {
    match t {
        0 | 1 | 2 | 4 | 6 => DecodeError::UnexpectedField { field: field_name(t), section },
        other => DecodeError::UnknownField(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_V2_1: &str = "AgETaHR0cDovL2V4YW1wbGUub3JnLwIFa2V5aWQAAAYgfN7nklEcW8b1KEhYBd_psk54XijiqZMB-dcRxgnjjvc";

    fn sample() -> Macaroon {
        Macaroon::from_parts(b"loc", b"id", &[b"a = 1", b"b = 2"], [9; 32])
    }

    #[test]
    fn libmacaroons_root_v2_1_decodes() {
        let m = Macaroon::decode(&format!("mac_{ROOT_V2_1}")).unwrap();
        assert_eq!(m.location(), Some(&b"http://example.org/"[..]));
        assert_eq!(m.identifier(), b"keyid");
        assert_eq!(m.caveat_count(), 0);
        assert_eq!(
            data_encoding::HEXLOWER.encode(m.signature()),
            "7cdee792511c5bc6f528485805dfe9b24e785e28e2a99301f9d711c609e38ef7"
        );
        assert_eq!(m.encode(), format!("mac_{ROOT_V2_1}"), "re-encoding is byte-identical");
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let back = Macaroon::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.caveats().collect::<Vec<_>>(), vec![&b"a = 1"[..], b"b = 2"]);
        assert!(!format!("{m:?}").contains("9, 9"), "Debug must not print the signature");
    }

    fn bin(m: &Macaroon) -> Vec<u8> {
        m.to_binary().to_vec()
    }

    #[test]
    fn strict_decoding_rejects_each_malformation() {
        let good = bin(&sample());
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (vec![], DecodeError::Truncated),
            (vec![1, 2, 3], DecodeError::UnsupportedVersion(1)),
            (b"MDAxY2xvY2F0aW9u".to_vec(), DecodeError::UnsupportedVersion(b'M')),
            (good[..good.len() - 1].to_vec(), DecodeError::Truncated),
            ([&good[..], &[0]].concat(), DecodeError::TrailingBytes(1)),
            // identifier before location in the header (out of order)
            (
                vec![2, 2, 1, b'i', 1, 1, b'l', 0],
                DecodeError::UnexpectedField { field: "location", section: "header".into() },
            ),
            // duplicate identifier
            (
                vec![2, 2, 1, b'i', 2, 1, b'j', 0],
                DecodeError::UnexpectedField { field: "identifier", section: "header".into() },
            ),
            (vec![2, 3, 1, b'x'], DecodeError::UnknownField(3)),
            (vec![2, 2, 0, 0], DecodeError::BadFieldLength { field: "identifier", len: 0 }),
            // non-minimal varint length (0x81 0x00)
            (vec![2, 2, 0x81, 0x00, b'i'], DecodeError::BadVarint),
            (vec![2, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], DecodeError::BadVarint),
            // signature of 31 bytes
            ([&[2u8, 2, 1, b'i', 0, 0, 6, 31][..], &[0u8; 31]].concat(), DecodeError::BadSignatureLength(31)),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            assert_eq!(Macaroon::decode_binary(bytes), Err(want), "case {i}");
        }
        assert_eq!(Macaroon::decode("MAC_x"), Err(DecodeError::MissingPrefix));
        assert_eq!(Macaroon::decode("mac_AgE="), Err(DecodeError::Base64), "padding is not accepted");
        assert_eq!(Macaroon::decode("mac_Ag+/"), Err(DecodeError::Base64), "standard alphabet is not accepted");
        assert_eq!(Macaroon::decode(&"m".repeat(MAX_ENCODED_LEN + 1)), Err(DecodeError::TooLarge(MAX_ENCODED_LEN + 1)));
    }

    #[test]
    fn caveat_limits_and_third_party_caveats() {
        let many: Vec<Vec<u8>> = (0..=MAX_CAVEATS).map(|i| format!("c{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = many.iter().map(|v| &v[..]).collect();
        let m = Macaroon::from_parts(b"", b"id", &refs, [0; 32]);
        assert_eq!(Macaroon::decode_binary(bin(&m)), Err(DecodeError::TooManyCaveats));
        // A third-party caveat: location + identifier + vid.
        let mut tp = vec![2, 2, 2, b'i', b'd', 0];
        tp.extend([1, 3, b'l', b'o', b'c', 2, 3, b'c', b'i', b'd', 4, 2, b'v', b'v', 0, 0, 6, 32]);
        tp.extend([0u8; 32]);
        assert_eq!(Macaroon::decode_binary(tp), Err(DecodeError::ThirdPartyCaveat { index: 0 }));
        let long = vec![b'x'; MAX_FIELD_LEN + 1];
        let m = Macaroon::from_parts(b"", b"id", &[&long], [0; 32]);
        assert_eq!(
            Macaroon::decode_binary(bin(&m)),
            Err(DecodeError::BadFieldLength { field: "caveat", len: MAX_FIELD_LEN + 1 })
        );
    }
}
