//! Framing: the header, bounded fields, and the errors of a frame that does not decode.
//! Pure: bytes in, values out.

use std::fmt;

use super::{ErrorCode, HEADER, MAX_FRAME, PROTOCOL_VERSION};

/// Why a frame did not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Error code to answer with.
    pub code: ErrorCode,
    /// What was wrong.
    pub reason: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code.as_str())
    }
}

impl std::error::Error for DecodeError {}

pub(super) fn malformed(reason: &'static str) -> DecodeError {
    DecodeError { code: ErrorCode::Malformed, reason }
}

pub(super) mod kind {
    pub const STATUS: u8 = 0x01;
    pub const SIGN_CERT: u8 = 0x02;
    pub const SEAL: u8 = 0x03;
    pub const UNSEAL: u8 = 0x04;
    pub const SIGN_CHECKPOINT: u8 = 0x05;
    pub const SIGN_EXEC: u8 = 0x06;
    pub const R_STATUS: u8 = 0x81;
    pub const R_CERT: u8 = 0x82;
    pub const R_SEALED: u8 = 0x83;
    pub const R_UNSEALED: u8 = 0x84;
    pub const R_CHECKPOINT: u8 = 0x85;
    pub const R_EXEC: u8 = 0x86;
    pub const C_SPAWN: u8 = 0x10;
    pub const C_PROBE: u8 = 0x11;
    pub const C_READY: u8 = 0x90;
    pub const C_SPAWNED: u8 = 0x91;
    pub const C_PROBES: u8 = 0x92;
    pub const ERROR: u8 = 0xFF;
}

/// An encoded request or response frame. It may carry a secret (a `Seal` plaintext, an `Unsealed`
/// answer), so it is zeroized when dropped; encoders reserve room before writing a secret, so no
/// reallocation leaves a copy behind.
pub type Frame = zeroize::Zeroizing<Vec<u8>>;

pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn new(kind: u8, id: u64) -> Self {
        let mut v = Vec::with_capacity(256);
        v.push(PROTOCOL_VERSION);
        v.push(kind);
        v.extend_from_slice(&id.to_be_bytes());
        Self(v)
    }
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    pub(super) fn bytes(&mut self, v: &[u8]) {
        // Callers bound their fields far below u16::MAX; clamp defensively rather than wrap.
        let n = v.len().min(u16::MAX as usize);
        self.u16(n as u16);
        self.0.extend_from_slice(&v[..n]);
    }
    pub(super) fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    /// Writes secret bytes without a reallocation after them.
    pub(super) fn secret(&mut self, v: &[u8]) {
        self.0.reserve_exact(2 + v.len());
        self.bytes(v);
    }
    pub(super) fn frame(self) -> Frame {
        zeroize::Zeroizing::new(self.0)
    }
    pub(super) fn strs(&mut self, v: &[String]) {
        let n = v.len().min(u8::MAX as usize);
        self.u8(n as u8);
        for s in &v[..n] {
            self.str(s);
        }
    }
    pub(super) fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
}

pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(malformed("frame truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub(super) fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub(super) fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(malformed("boolean field is neither 0 nor 1")),
        }
    }
    pub(super) fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(DecodeError { code: ErrorCode::TooLarge, reason: "field longer than its limit" });
        }
        self.take(n)
    }
    pub(super) fn str(&mut self, max: usize) -> Result<String, DecodeError> {
        let b = self.bytes(max)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| malformed("string field is not UTF-8"))
    }
    pub(super) fn strs(&mut self, max_items: usize, max_len: usize) -> Result<Vec<String>, DecodeError> {
        let n = self.u8()? as usize;
        if n > max_items {
            return Err(DecodeError { code: ErrorCode::TooLarge, reason: "list has too many items" });
        }
        (0..n).map(|_| self.str(max_len)).collect()
    }
    pub(super) fn opt_str(&mut self, max: usize) -> Result<Option<String>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str(max).map(Some),
            _ => Err(malformed("option tag is neither 0 nor 1")),
        }
    }
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() { Ok(()) } else { Err(malformed("trailing bytes after the frame body")) }
    }
}

/// Splits a frame into (kind, id, body) after checking size and version.
pub(super) fn open_frame(frame: &[u8]) -> Result<(u8, u64, Reader<'_>), DecodeError> {
    if frame.len() > MAX_FRAME {
        return Err(DecodeError { code: ErrorCode::TooLarge, reason: "frame exceeds 16 KiB" });
    }
    if frame.len() < HEADER {
        return Err(malformed("frame shorter than its 10-byte header"));
    }
    if frame[0] != PROTOCOL_VERSION {
        return Err(DecodeError { code: ErrorCode::UnsupportedVersion, reason: "unsupported protocol version" });
    }
    let id = u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes"));
    Ok((frame[1], id, Reader { buf: &frame[HEADER..] }))
}

/// The request id of a frame, if its header is readable (used to address an error reply).
pub fn frame_id(frame: &[u8]) -> u64 {
    frame.get(2..10).map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

pub(super) const MAX_STR: usize = 4096;
pub(super) const MAX_NAME: usize = 256;
