//! MCP: JSON-RPC 2.0 and Model Context Protocol types and dispatch, transport-agnostic.
//!
//! Pure: no sockets, no clock, no broker types. [`jsonrpc`] decodes and encodes messages;
//! [`version`] knows the protocol revisions and their two eras (session: `initialize` and
//! `Mcp-Session-Id`; stateless: per-request `_meta`); [`server`] validates and classifies requests
//! and shapes results per revision; [`types`] describes tools and resources. The HTTP transport is
//! `broker::http::mcp`; the tools are `broker::tools`.

pub mod jsonrpc;
pub mod server;
pub(crate) mod types;
pub mod version;
