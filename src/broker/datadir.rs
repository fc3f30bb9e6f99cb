//! The data directory layout and its permissions.
//!
//! ```text
//! <data-dir>/            0711 root (or the invoking user)   traversable, not listable
//!   keys/                0700 root      CA key, sealing key   (signer only; `signer::keys`)
//!   state/               0700 broker    tasks, sealed root keys, journal
//!   audit/               0700 broker    audit log
//!   recordings/          0700 broker    SSH session recordings
//!   tls/                 0700 broker    the listeners' local CA and certificate
//!   ephyr.sock           0666           local API (SO_PEERCRED decides who may do what)
//! ```
//!
//! What runs here: `mkdir`, `chmod`, `chown` at start-up, before the privilege drop. A temporary
//! dev data dir (`serve --dev` without `--data-dir`) lives under `$TMPDIR`, is owned by the broker
//! user, and is removed at exit.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::signer::protocol::KeyPaths;
use crate::users::Account;

/// Replaces a file of the data dir atomically and durably, mode 0600 ([`crate::files::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    crate::files::write_atomic(path, bytes, 0o600)
}

/// Default persistent data dir.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ephyr";
/// Default config dir.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/ephyr";

/// A data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    /// Its path.
    pub root: PathBuf,
    /// Created for this run only; removed at exit.
    pub temporary: bool,
}

impl DataDir {
    /// A persistent data dir at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), temporary: false }
    }

    /// Creates a fresh temporary data dir.
    pub fn temporary() -> io::Result<Self> {
        let mut r = [0u8; 6];
        crate::secret::random_bytes(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
        let root = std::env::temp_dir().join(format!("ephyr-dev-{}", data_encoding::HEXLOWER.encode(&r)));
        fs::DirBuilder::new().mode(0o700).create(&root)?;
        Ok(Self { root, temporary: true })
    }

    /// Key file paths.
    pub fn keys(&self) -> KeyPaths {
        KeyPaths::new(&self.root)
    }

    /// Broker state.
    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Audit log directory.
    pub fn audit(&self) -> PathBuf {
        self.root.join("audit")
    }

    /// The listeners' local CA and certificate (made by the broker's user).
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// SSH command recordings.
    pub fn recordings(&self) -> PathBuf {
        self.root.join("recordings")
    }

    /// Default local socket path.
    pub fn socket(&self) -> PathBuf {
        self.root.join("ephyr.sock")
    }

    /// Creates the directories with their modes; when `owner` is given (started as root) hands the
    /// broker-writable ones to it. Each call changes only what differs, so a service whose
    /// directories `ephyr init` already handed over starts without CAP_CHOWN or CAP_FOWNER.
    pub fn prepare(&self, owner: Option<&Account>) -> Result<(), String> {
        let ctx = |p: &Path| {
            let p = p.to_owned();
            move |e: io::Error| format!("{}: {e}", p.display())
        };
        let root_mode = if self.temporary { 0o700 } else { 0o711 };
        fs::DirBuilder::new().recursive(true).mode(root_mode).create(&self.root).map_err(ctx(&self.root))?;
        for dir in [self.state(), self.audit(), self.recordings(), self.tls()] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(ctx(&dir))?;
            // Only when it differs: the service starts as root without CAP_FOWNER (its unit's
            // bounding set), so it may not chmod a directory the broker's user already owns.
            if fs::metadata(&dir).map_err(ctx(&dir))?.permissions().mode() & 0o7777 != 0o700 {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(ctx(&dir))?;
            }
        }
        if let Some(o) = owner {
            let mut owned = vec![self.state(), self.audit(), self.recordings(), self.tls()];
            if self.temporary {
                owned.push(self.root.clone());
            }
            for dir in owned {
                let m = fs::metadata(&dir).map_err(ctx(&dir))?;
                if (m.uid(), m.gid()) == (o.uid, o.gid) {
                    continue;
                }
                std::os::unix::fs::chown(&dir, Some(o.uid), Some(o.gid)).map_err(|e| {
                    format!(
                        "{}: handing it to the broker's user (uid {}): {e}{}",
                        dir.display(),
                        o.uid,
                        if e.kind() == io::ErrorKind::PermissionDenied {
                            " (a service without CAP_CHOWN needs `ephyr init` to have prepared the data dir)"
                        } else {
                            ""
                        }
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Removes a temporary data dir (no-op for a persistent one).
    pub fn remove_if_temporary(&self) {
        if self.temporary
            && let Err(e) = fs::remove_dir_all(&self.root)
        {
            log::warn!("could not remove the temporary data dir {}: {e}", self.root.display());
        }
    }
}
