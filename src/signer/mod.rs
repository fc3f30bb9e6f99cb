//! The signer: the only process that holds the CA key and the sealing key.
//!
//! Started by the broker as `ephyr __signer ...` (fork+exec of `/proc/self/exe`, control socket on
//! descriptor 3). It is two kinds of process: the *keeper* (reads the keys, enters the sandbox,
//! forks workers on request) and *workers* (answer framed requests on their own socket). Neither
//! ever touches the filesystem or the network after start-up. See `keeper` and `sandbox` for what
//! runs, and `protocol` for the wire format shared with the broker.
//!
//! May depend on `crate::os`, `crate::secret`, `crate::time`; never on `broker` or `macaroon`.

pub mod custody;
pub(crate) mod keeper;
pub mod keys;
pub mod protocol;
pub(crate) mod sandbox;
pub(crate) mod worker;

use std::path::PathBuf;

pub use custody::SignerConfig;
pub use sandbox::TargetIds;

/// How the keeper was started (parsed from its command line by `main`).
#[derive(Clone, Debug)]
pub struct SignerArgs {
    /// Data dir with `keys/`; `None` = ephemeral in-memory keys (a throwaway dev broker).
    pub data_dir: Option<PathBuf>,
    /// Create missing keys before loading (dev mode with a persistent data dir).
    pub generate_missing_keys: bool,
    /// Unprivileged ids to switch to when started as root.
    pub target: Option<TargetIds>,
    /// Limits.
    pub config: SignerConfig,
    /// Serve even if a sandbox layer is missing (logged loudly, reported everywhere).
    pub insecure_no_sandbox: bool,
    /// Run the sandbox self-check probes, report them, and exit.
    pub self_check: bool,
}

/// Entry point of `ephyr __signer`. Returns the exit code.
pub fn run(args: SignerArgs) -> i32 {
    crate::logging::init("signer");
    keeper::run(args)
}
