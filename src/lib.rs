//! ephyr: an access broker between AI agents and infrastructure.
//!
//! One binary, two kinds of process (DESIGN.md §1): the sandboxed **signer** (`signer`), which holds
//! the CA and sealing keys, and the **broker** (`broker`), which runs everything else on one
//! single-threaded executor. `macaroon` (task tokens) and `mcp` (protocol types) are pure libraries
//! the broker uses.
//!
//! Unsafe code: every module is `forbid(unsafe_code)` except `os`, the one place with raw system
//! calls, where each `unsafe` block carries a `// SAFETY:` comment.

#![deny(unsafe_code)]
#![warn(missing_docs)]

#[allow(unsafe_code)]
pub mod os;

#[forbid(unsafe_code)]
pub mod broker;
#[forbid(unsafe_code)]
pub mod cli;
#[forbid(unsafe_code)]
pub mod command;
#[forbid(unsafe_code)]
pub mod files;
#[doc(hidden)]
#[forbid(unsafe_code)]
pub mod fuzzing;
#[forbid(unsafe_code)]
pub mod ids;
#[forbid(unsafe_code)]
pub mod inspect;
#[forbid(unsafe_code)]
pub mod logging;
#[forbid(unsafe_code)]
pub mod macaroon;
#[forbid(unsafe_code)]
pub mod mcp;
#[forbid(unsafe_code)]
pub mod secret;
#[forbid(unsafe_code)]
pub mod shim;
#[forbid(unsafe_code)]
pub mod signer;
#[forbid(unsafe_code)]
pub mod time;
#[forbid(unsafe_code)]
pub mod users;
