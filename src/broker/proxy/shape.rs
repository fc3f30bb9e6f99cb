//! The proxy's own errors in the shape the agent's SDK parses (`services.<name>.errors`): an
//! answer the broker makes instead of the upstream's (refused, unauthenticated, rate-limited,
//! upstream unreachable), and the last event of a server-sent-event stream the broker cuts
//! (task revoked or expired, size or time limit). Without this, an SDK shows a bare
//! `Error code: 403` and a cut stream as a connection error; with it, the broker's reason.
//!
//! What runs here: nothing; pure functions. Every message starts with `ephyr: ` so the user can
//! tell the broker's refusal from the provider's.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

use crate::broker::policy::ErrorStyle;

/// OpenAI's error `type` for a status.
fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        423 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    }
}

/// Anthropic's error `type` for a status.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 | 423 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The JSON body of an error answer.
pub fn body(style: ErrorStyle, status: StatusCode, code: &str, message: &str) -> Value {
    let text = format!("ephyr: {message} ({code})");
    match style {
        ErrorStyle::Plain => json!({ "error": code, "message": message }),
        ErrorStyle::OpenAi => {
            json!({ "error": { "message": text, "type": openai_type(status), "code": code, "param": null } })
        }
        ErrorStyle::Anthropic => {
            json!({ "type": "error", "error": { "type": anthropic_type(status), "message": text, "code": code } })
        }
    }
}

/// The last event of a cut event stream: `message` says why (`code` for machines). With
/// `open_event` (what was sent last did not end an event) the open event is closed first.
pub fn stream_end(style: ErrorStyle, code: &str, message: &str, open_event: bool) -> Bytes {
    let status = StatusCode::FORBIDDEN;
    let event = match style {
        // The OpenAI SDKs raise on a data event with an `error` member.
        ErrorStyle::OpenAi => format!("data: {}\n\n", body(style, status, code, message)),
        // The Anthropic SDKs raise on an `error` event.
        ErrorStyle::Anthropic => format!("event: error\ndata: {}\n\n", body(style, status, code, message)),
        ErrorStyle::Plain => format!("event: error\ndata: {}\n\n", body(style, status, code, message)),
    };
    Bytes::from(if open_event { format!("\n\n{event}") } else { event })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_style_carries_the_reason_where_its_sdk_reads_it() {
        let s = StatusCode::FORBIDDEN;
        let o = body(ErrorStyle::OpenAi, s, "path_not_allowed", "no grant for /files");
        assert_eq!(o["error"]["message"], "ephyr: no grant for /files (path_not_allowed)");
        assert_eq!(
            (o["error"]["type"].as_str(), o["error"]["code"].as_str()),
            (Some("permission_error"), Some("path_not_allowed"))
        );
        let a = body(ErrorStyle::Anthropic, StatusCode::UNAUTHORIZED, "invalid_token", "bad");
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "authentication_error");
        assert_eq!(a["error"]["message"], "ephyr: bad (invalid_token)");
        let p = body(ErrorStyle::Plain, s, "c", "m");
        assert_eq!(p, json!({ "error": "c", "message": "m" }));
        assert_eq!(anthropic_type(StatusCode::TOO_MANY_REQUESTS), "rate_limit_error");
        assert_eq!(openai_type(StatusCode::BAD_GATEWAY), "server_error");
    }

    #[test]
    fn a_stream_end_is_one_whole_event_and_closes_an_open_one() {
        let e = stream_end(ErrorStyle::Anthropic, "task_revoked", "the task was revoked", false);
        let t = std::str::from_utf8(&e).unwrap();
        assert!(t.starts_with("event: error\ndata: {") && t.ends_with("}\n\n"), "{t}");
        let v: Value = serde_json::from_str(t.trim_start_matches("event: error\ndata: ").trim()).unwrap();
        assert_eq!(v["error"]["message"], "ephyr: the task was revoked (task_revoked)");
        let o = stream_end(ErrorStyle::OpenAi, "task_revoked", "x", true);
        assert!(o.starts_with(b"\n\ndata: {\"error\""), "{o:?}");
    }
}
