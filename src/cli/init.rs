//! `ephyr init`: create the data and config directories, the keys and an example policy.
//!
//! What runs here: `mkdir`, key generation (ring CSPRNG), atomic file writes, `chown` when root.
//! Idempotent: existing keys are kept unless `--force-new-ca` (which replaces only the CA key).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use crate::broker::datadir::DataDir;
use crate::broker::privileges;
use crate::signer::keys::{FileAction, ensure_keys};

/// Example policy written when none exists.
pub const EXAMPLE_POLICY: &str = include_str!("../../policies/example.yaml");

/// Options of `ephyr init`.
#[derive(Debug, Default)]
pub struct InitOptions {
    /// Data dir.
    pub data_dir: PathBuf,
    /// Config dir.
    pub config_dir: PathBuf,
    /// Replace an existing CA key.
    pub force_new_ca: bool,
    /// Broker account (when root).
    pub broker_user: Option<String>,
    /// Signer account (when root).
    pub signer_user: Option<String>,
}

/// Runs `ephyr init`. Human messages go to stderr; stdout gets only the CA public key line.
pub fn run(o: &InitOptions) -> Result<(), String> {
    let root = privileges::is_root();
    let ids = if root {
        Some(privileges::resolve_identities(o.broker_user.as_deref(), o.signer_user.as_deref())?)
    } else {
        None
    };
    let data = DataDir::at(&o.data_dir);
    data.prepare(ids.as_ref().map(|i| &i.broker))?;
    fs::set_permissions(&data.root, fs::Permissions::from_mode(0o711))
        .map_err(|e| format!("{}: {e}", data.root.display()))?;
    let report = ensure_keys(&data.root, o.force_new_ca).map_err(|e| e.to_string())?;
    let say = |what: &str, a: FileAction| match a {
        FileAction::Kept => eprintln!("kept     {what} (exists)"),
        FileAction::Created => eprintln!("created  {what}"),
        FileAction::Replaced => eprintln!("REPLACED {what}"),
    };
    say(&data.keys().ca_key().display().to_string(), report.ca_key);
    say(&data.keys().sealing_key().display().to_string(), report.sealing_key);
    if report.ca_key == FileAction::Replaced {
        eprintln!(
            "warning: the CA key was replaced (--force-new-ca). Targets that trust only the old CA line will \
             refuse new certificates until you install the new line below; remove the old line to stop \
             trusting certificates it signed."
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&o.config_dir)
        .map_err(|e| format!("{}: {e}", o.config_dir.display()))?;
    let policy = o.config_dir.join("policy.yaml");
    if policy.exists() {
        eprintln!("kept     {} (exists)", policy.display());
    } else {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&policy)
            .map_err(|e| format!("{}: {e}", policy.display()))?;
        f.write_all(EXAMPLE_POLICY.as_bytes()).map_err(|e| format!("{}: {e}", policy.display()))?;
        if let Some(i) = &ids {
            // root owns it, the broker's group may read it (reloads happen after the drop).
            std::os::unix::fs::chown(&policy, Some(0), Some(i.broker.gid))
                .map_err(|e| format!("{}: {e}", policy.display()))?;
        }
        eprintln!("created  {}", policy.display());
    }
    if let Some(i) = &ids {
        eprintln!("broker user: {}   signer user: {}", i.broker, i.signer);
    }
    eprintln!("\nCA public key for TrustedUserCAKeys on your targets (also in {}):", data.keys().ca_pub().display());
    println!("{}", report.ca_public_line);
    Ok(())
}
