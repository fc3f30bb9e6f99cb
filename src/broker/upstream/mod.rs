//! Outbound HTTP: everything the broker needs to send a request to an upstream on an agent's
//! behalf and pass the answer back safely. The HTTP proxy uses it today; federation will too.
//!
//! - [`conn`]: name resolution (blocking pool), the connection to one of the checked addresses,
//!   TLS (rustls on ring; the system roots or a pinned CA file; client certificates), and the
//!   pool of idle HTTP/1.1 connections (tasks on the executor).
//! - [`plan`]: what is sent and returned: hop-by-hop and credential-bearing headers dropped, the
//!   credential injected (header, bearer, basic, query), URL-to-service matching, the forms of the
//!   secret to scrub, refused transfer-codings.
//! - [`scrub`]: the injected secret removed from what comes back (pure).
//! - [`body`]: the streaming response body (bounded, timed, scrubbed, cut with its task).
//!
//! Deciding stays elsewhere: the caller asks `authorize` with the resolved host and addresses
//! (`ActionKind::HttpUpstream`) before anything leaves.

pub(crate) mod body;
pub(crate) mod conn;
pub(crate) mod plan;
pub(crate) mod scrub;
