//! `ephyr shim`: the verifier a `verify_on_target` target runs as sshd's forced command. It runs
//! the command it is given only when it comes with an exec envelope the signer signed for this
//! target, this user, not yet expired, and never used before here.
//!
//! What runs here, on the target, as the role's Unix user: read `SSH_ORIGINAL_COMMAND` (sshd puts
//! the client's command there), check the SSHSIG against the user CA's public key file, check the
//! envelope's target, principal and expiry, record its nonce in `~/.ephyr-shim/` (created with
//! `O_EXCL`: a second use fails; expired nonces are pruned), then replace itself with the user's
//! login shell running exactly the signed command. Any failure refuses with exit 126 and a line on
//! stderr naming why; nothing runs.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use ssh_key::PublicKey;

use crate::signer::protocol::exec::{self, Envelope};

/// Exit status of a refusal (the shell's "cannot execute").
pub const REFUSED: i32 = 126;

/// The shim's arguments (from the forced command, which the certificate or sshd fixes).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// This target's name in the broker's policy.
    pub target: String,
    /// The user CA's public key file (one or more OpenSSH public key lines).
    pub ca: PathBuf,
    /// Where used nonces are kept (default `$HOME/.ephyr-shim`).
    pub state: Option<PathBuf>,
}

/// Everything the shim checks before it runs a command; `Ok` is the envelope to run.
pub fn check(o: &Options, wire: Option<&str>, user: &str, now: u64) -> Result<Envelope, String> {
    let wire = wire.ok_or("this account runs only commands the broker signed; an interactive login is refused")?;
    let text = std::fs::read_to_string(&o.ca).map_err(|e| format!("{}: {e}", o.ca.display()))?;
    let keys: Vec<PublicKey> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| PublicKey::from_openssh(l).ok())
        .collect();
    if keys.is_empty() {
        return Err(format!("{}: no OpenSSH public key in it", o.ca.display()));
    }
    let mut last = String::new();
    let env = keys
        .iter()
        .find_map(|k| exec::verify_wire(wire, k).map_err(|e| last = e).ok())
        .ok_or_else(|| format!("refused: {last}"))?;
    if env.target != o.target {
        return Err(format!("refused: the envelope is for target {:?}, this is {:?}", env.target, o.target));
    }
    if env.principal != user {
        return Err(format!("refused: the envelope is for user {:?}, this is {user:?}", env.principal));
    }
    if env.expires <= now {
        return Err(format!("refused: the envelope expired at {} (now {now})", env.expires));
    }
    Ok(env)
}

/// Records `env`'s nonce in `dir` once; a second time is a replay. Prunes expired nonces.
pub fn use_nonce(dir: &Path, env: &Envelope, now: u64) -> Result<(), String> {
    let ctx = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(ctx)?;
    for entry in std::fs::read_dir(dir).map_err(ctx)?.flatten() {
        let expired = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .is_none_or(|until| until <= now);
        if expired {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let path = dir.join(&env.nonce);
    let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(format!("refused: envelope {} was already used here (a replay)", env.nonce));
        }
        Err(e) => return Err(ctx(e)),
    };
    f.write_all(env.expires.to_string().as_bytes()).and_then(|()| f.sync_all()).map_err(ctx)
}

/// Runs the shim: checks, records the nonce, and becomes the user's shell running the command.
/// Returns only on refusal (the error) — on success the process is replaced.
pub fn run(o: &Options) -> String {
    let wire = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let (_, euid, _) = crate::os::user_ids();
    let Some(user) = crate::users::name_of(euid) else {
        return format!("refused: uid {euid} has no user name");
    };
    let now = crate::time::now().secs() as u64;
    let env = match check(o, wire.as_deref(), &user, now) {
        Ok(env) => env,
        Err(e) => return e,
    };
    let state = o
        .state
        .clone()
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ephyr-shim")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"));
    if let Err(e) = use_nonce(&state, &env, now) {
        return e;
    }
    let shell = std::env::var("SHELL").ok().filter(|s| s.starts_with('/')).unwrap_or_else(|| "/bin/sh".into());
    let e = std::process::Command::new(&shell).arg("-c").arg(&env.command).exec();
    format!("could not run {shell}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(nonce: &str, expires: u64) -> Envelope {
        Envelope { target: "web".into(), principal: "u".into(), expires, nonce: nonce.into(), command: "id".into() }
    }

    #[test]
    fn a_nonce_is_used_once_and_expired_ones_are_pruned() {
        let dir = std::env::temp_dir().join(format!("ephyr-shim-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = env("0123456789abcdef0123456789abcdef", 200);
        use_nonce(&dir, &a, 100).unwrap();
        assert!(use_nonce(&dir, &a, 150).unwrap_err().contains("already used"));
        // Once it has expired it is pruned (and the envelope itself is refused by `check`).
        let b = env("fedcba9876543210fedcba9876543210", 400);
        use_nonce(&dir, &b, 300).unwrap();
        assert!(!dir.join(&a.nonce).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_command_or_no_ca_is_refused() {
        let o = Options { target: "web".into(), ca: "/nonexistent/ca.pub".into(), state: None };
        assert!(check(&o, None, "u", 1).unwrap_err().contains("interactive login is refused"));
        assert!(check(&o, Some("ephyr-exec-v1 a b"), "u", 1).unwrap_err().contains("/nonexistent/ca.pub"));
    }
}
