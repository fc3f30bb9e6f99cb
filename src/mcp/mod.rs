//! MCP: JSON-RPC 2.0 and Model Context Protocol types and dispatch, transport-agnostic.
//!
//! Filled in by the MCP-endpoint issue.
