//! The broker: everything except key custody, on one single-threaded smol executor.
//!
//! Entry point: [`serve::run`]. What runs where is documented per module: `serve` (start-up,
//! signals, shutdown), `signer_client` (the signer processes), `http` (listeners and connections),
//! `routes` (the TCP endpoints), `local` (the Unix-socket API), `privileges` (the drop),
//! `blocking` (the bounded pool for blocking work), `datadir` (files), `policy` (configuration).

pub mod blocking;
pub mod datadir;
pub mod http;
pub mod local;
pub mod policy;
pub mod privileges;
pub mod routes;
pub mod serve;
pub mod signer_client;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

/// Shared broker state, owned by the executor thread.
pub struct Broker {
    /// The signer.
    pub signer: signer_client::Signer,
    /// The current policy (swapped whole on reload).
    pub policy: RefCell<Rc<policy::Policy>>,
    /// When the broker started.
    pub started: Instant,
    /// Who the broker runs as.
    pub identity: privileges::Dropped,
    /// The data dir.
    pub data_dir: datadir::DataDir,
    /// MCP/API listener address.
    pub listen: SocketAddr,
    /// Dashboard listener address.
    pub dashboard_listen: SocketAddr,
    /// Local socket path.
    pub socket: PathBuf,
    /// Pool for blocking work.
    pub pool: blocking::BlockingPool,
}

impl Broker {
    /// The current policy.
    pub fn policy(&self) -> Rc<policy::Policy> {
        self.policy.borrow().clone()
    }
}
