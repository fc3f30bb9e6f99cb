//! A signer worker: answers requests on one SEQPACKET socket until the broker closes it.
//!
//! What runs here: one thread, forked from the keeper, under the keeper's sandbox plus the stricter
//! worker seccomp profile. System calls: `recv`/`send` on its socket, `clock_gettime`, `getrandom`,
//! memory management, `write` to stderr (log), exit. Oversized, truncated or malformed frames get
//! an error frame and the loop carries on; nothing a broker sends can make it exit except EOF.

use std::os::fd::{AsFd, OwnedFd};

use super::custody::Custody;
use super::protocol::{ErrorCode, MAX_FRAME, Request, Response, SignerError, frame_id};
use crate::os;

/// Serves requests until EOF, then exits the process.
pub fn serve(sock: OwnedFd, custody: &Custody) -> ! {
    // Frames may carry secrets (Seal plaintexts): the buffer is wiped after each one and on drop.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_FRAME]);
    loop {
        let pkt = match os::recv_packet(sock.as_fd(), &mut buf) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => os::exit_now(1),
        };
        if pkt.len == 0 && !pkt.truncated {
            os::exit_now(0);
        }
        let frame = &buf[..pkt.len];
        let (id, response) = if pkt.truncated {
            let e = SignerError { code: ErrorCode::TooLarge, message: format!("frame exceeds {MAX_FRAME} bytes") };
            (frame_id(frame), Response::Error(e))
        } else {
            match Request::decode(frame) {
                Ok((id, req)) => (id, custody.handle(req, crate::time::now().secs().max(0) as u64)),
                Err(e) => {
                    log::warn!("rejected a request frame: {e}");
                    (frame_id(frame), Response::Error(SignerError { code: e.code, message: e.reason.into() }))
                }
            }
        };
        zeroize::Zeroize::zeroize(&mut buf[..pkt.len]);
        if os::send_packet(sock.as_fd(), &response.encode(id)).is_err() {
            os::exit_now(1);
        }
    }
}
