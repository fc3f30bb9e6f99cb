//! Key custody on disk: the Ed25519 CA key and the sealing key, in `<data-dir>/keys/`.
//!
//! What runs here: file reads and writes only (no threads, no sockets). `ephyr init` and the
//! signer (before it drops privileges and seals off the filesystem) call it. Files:
//!
//! | file | format | mode |
//! |---|---|---|
//! | `keys/ca_key` | OpenSSH private key (Ed25519), so `ssh-keygen -y -f` can read it | 0600 |
//! | `keys/ca_key.pub` | OpenSSH public key line + newline, for `TrustedUserCAKeys` | 0644 |
//! | `keys/sealing_key` | `ephyr-sealing-key-v1 <base64url>` + newline (32 random bytes) | 0600 |
//!
//! New files are written to a temporary name with `O_EXCL` and mode 0600, fsynced, renamed into
//! place and the directory fsynced, so a crash never leaves a half-written key.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use data_encoding::{BASE64, BASE64URL_NOPAD};
use ring::signature::{Ed25519KeyPair, KeyPair};
use ssh_key::private::{Ed25519Keypair, Ed25519PrivateKey, KeypairData};
use ssh_key::public::{Ed25519PublicKey, KeyData};
use ssh_key::{LineEnding, PrivateKey, PublicKey};
use zeroize::Zeroizing;

use super::protocol::KeyPaths;
use crate::secret::SecretBytes;

const SEALING_HEADER: &str = "ephyr-sealing-key-v1";
/// Comment on the CA public key line.
pub const CA_COMMENT: &str = "ephyr-ca";

/// Why keys could not be loaded or written.
#[derive(Debug)]
pub enum KeyError {
    /// A key file could not be read or written. The caller should check the path and permissions
    /// (the signer reads keys before it drops privileges, so it needs to start as their owner).
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A key file exists but its contents are not a valid key of the expected kind.
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never includes key material).
        reason: String,
    },
    /// The system random number generator failed.
    Random,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            KeyError::Invalid { path, reason } => write!(f, "{}: {reason}", path.display()),
            KeyError::Random => f.write_str("the system random number generator failed"),
        }
    }
}

impl std::error::Error for KeyError {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// Fills `buf` from the system CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), KeyError> {
    crate::secret::random_bytes(buf).map_err(|_| KeyError::Random)
}

/// The Ed25519 certificate authority key. Never printed; zeroized on drop.
pub struct CaKey {
    seed: SecretBytes,
    public: [u8; 32],
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaKey({})", self.public_line())
    }
}

impl CaKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        random_bytes(&mut seed[..])?;
        Self::from_seed(&seed)
    }

    /// The key for a 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, KeyError> {
        let kp = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyError::Random)?;
        let public: [u8; 32] = kp.public_key().as_ref().try_into().map_err(|_| KeyError::Random)?;
        Ok(Self { seed: SecretBytes::new(seed.to_vec()), public })
    }

    /// Parses an unencrypted OpenSSH Ed25519 private key.
    pub fn parse_openssh(text: &[u8], path: &Path) -> Result<Self, KeyError> {
        let invalid = |reason: &str| KeyError::Invalid { path: path.to_owned(), reason: reason.into() };
        let key = PrivateKey::from_openssh(text).map_err(|_| invalid("not an OpenSSH private key"))?;
        if key.is_encrypted() {
            return Err(invalid("the CA key is passphrase-encrypted; the signer needs it unencrypted"));
        }
        let KeypairData::Ed25519(kp) = key.key_data() else {
            return Err(invalid("the CA key must be Ed25519"));
        };
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(kp.private.to_bytes());
        let ca = Self::from_seed(&seed)?;
        if ca.public != kp.public.0 {
            return Err(invalid("the private and public halves of the CA key do not match"));
        }
        Ok(ca)
    }

    /// OpenSSH private key text (secret).
    pub fn to_openssh(&self) -> Result<Zeroizing<String>, KeyError> {
        let seed: [u8; 32] = self.seed.expose().try_into().map_err(|_| KeyError::Random)?;
        let kp =
            Ed25519Keypair { public: Ed25519PublicKey(self.public), private: Ed25519PrivateKey::from_bytes(&seed) };
        let key = PrivateKey::new(KeypairData::Ed25519(kp), CA_COMMENT).map_err(|_| KeyError::Random)?;
        key.to_openssh(LineEnding::LF).map_err(|_| KeyError::Random)
    }

    /// The public key as an OpenSSH line, without a trailing newline.
    pub fn public_line(&self) -> String {
        let pk = PublicKey::new(KeyData::Ed25519(Ed25519PublicKey(self.public)), CA_COMMENT);
        pk.to_openssh().unwrap_or_default()
    }

    /// Raw public key bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.public
    }

    /// A ring key pair for signing.
    pub fn keypair(&self) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_and_public_key(self.seed.expose(), &self.public)
            .expect("seed and public key were derived together")
    }
}

/// The 32-byte master secret from which the signer derives its sealing (AEAD) key and its audit
/// checkpoint key. Never printed; zeroized on drop.
pub struct SealingKey(SecretBytes);

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey([redacted])")
    }
}

impl SealingKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = vec![0u8; 32];
        random_bytes(&mut k)?;
        Ok(Self(SecretBytes::new(k)))
    }

    /// The secret bytes (only the signer's custody code uses them).
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{SEALING_HEADER} {}\n", BASE64URL_NOPAD.encode(self.0.expose())))
    }

    fn parse(text: &[u8], path: &Path) -> Result<Self, KeyError> {
        let invalid = || KeyError::Invalid {
            path: path.to_owned(),
            reason: format!("expected one line '{SEALING_HEADER} <43 base64url characters>'"),
        };
        let text = std::str::from_utf8(text).map_err(|_| invalid())?;
        let rest = text.trim_end_matches('\n').strip_prefix(SEALING_HEADER).ok_or_else(invalid)?;
        let b64 = rest.strip_prefix(' ').ok_or_else(invalid)?;
        let bytes = Zeroizing::new(BASE64URL_NOPAD.decode(b64.as_bytes()).map_err(|_| invalid())?);
        if bytes.len() != 32 {
            return Err(invalid());
        }
        Ok(Self(SecretBytes::new(bytes.to_vec())))
    }
}

/// What happened to one key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAction {
    /// It existed and was left alone.
    Kept,
    /// It was created.
    Created,
    /// It existed and was replaced (`--force-new-ca`).
    Replaced,
}

/// Result of [`ensure_keys`].
#[derive(Debug)]
pub struct EnsureReport {
    /// The CA key file.
    pub ca_key: FileAction,
    /// The sealing key file.
    pub sealing_key: FileAction,
    /// The CA public key line (no newline).
    pub ca_public_line: String,
}

/// Creates `keys/` (0700) and any missing key, never overwriting an existing key unless
/// `force_new_ca` (which replaces only the CA key). Rewrites `ca_key.pub` from the private key.
pub fn ensure_keys(data_dir: &Path, force_new_ca: bool) -> Result<EnsureReport, KeyError> {
    let paths = KeyPaths::new(data_dir);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&paths.dir).map_err(io_err(&paths.dir))?;
    let ca_path = paths.ca_key();
    let (ca, ca_action) = match read_existing(&ca_path)? {
        Some(text) if !force_new_ca => (CaKey::parse_openssh(&text, &ca_path)?, FileAction::Kept),
        existing => {
            let ca = CaKey::generate()?;
            write_file_atomic(&ca_path, ca.to_openssh()?.as_bytes(), 0o600)?;
            (ca, if existing.is_some() { FileAction::Replaced } else { FileAction::Created })
        }
    };
    let line = ca.public_line();
    let pub_path = paths.ca_pub();
    let want = format!("{line}\n");
    if read_existing(&pub_path)?.as_deref().map(|b| &b[..]) != Some(want.as_bytes()) {
        write_file_atomic(&pub_path, want.as_bytes(), 0o644)?;
    }
    let seal_path = paths.sealing_key();
    let (sealing, sealing_action) = match read_existing(&seal_path)? {
        Some(text) => (SealingKey::parse(&text, &seal_path)?, FileAction::Kept),
        None => {
            let s = SealingKey::generate()?;
            write_file_atomic(&seal_path, s.encode().as_bytes(), 0o600)?;
            (s, FileAction::Created)
        }
    };
    // The audit checkpoint public key, for verifiers (public, 0644).
    use ring::signature::KeyPair as _;
    let ckpt = base64(super::custody::checkpoint_keypair(&sealing).public_key().as_ref());
    let ckpt_path = paths.checkpoint_pub();
    if read_existing(&ckpt_path)?.as_deref().map(|b| &b[..]) != Some(format!("{ckpt}\n").as_bytes()) {
        write_file_atomic(&ckpt_path, format!("{ckpt}\n").as_bytes(), 0o644)?;
    }
    Ok(EnsureReport { ca_key: ca_action, sealing_key: sealing_action, ca_public_line: line })
}

/// Loads both keys.
pub fn load_keys(data_dir: &Path) -> Result<(CaKey, SealingKey), KeyError> {
    let paths = KeyPaths::new(data_dir);
    let ca_path = paths.ca_key();
    let ca_text = Zeroizing::new(fs::read(&ca_path).map_err(io_err(&ca_path))?);
    let ca = CaKey::parse_openssh(&ca_text, &ca_path)?;
    let seal_path = paths.sealing_key();
    let seal_text = Zeroizing::new(fs::read(&seal_path).map_err(io_err(&seal_path))?);
    Ok((ca, SealingKey::parse(&seal_text, &seal_path)?))
}

/// Reads the CA public key line from `keys/ca_key.pub` (readable by anyone).
pub fn read_ca_public_line(data_dir: &Path) -> Result<String, KeyError> {
    let path = KeyPaths::new(data_dir).ca_pub();
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let line = text.trim_end().to_owned();
    PublicKey::from_openssh(&line)
        .map_err(|_| KeyError::Invalid { path: path.clone(), reason: "not an OpenSSH public key".into() })?;
    Ok(line)
}

fn read_existing(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(Zeroizing::new(b))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KeyError::Io { path: path.to_owned(), source: e }),
    }
}

/// Writes `contents` to `path` atomically with `mode` ([`crate::files::write_atomic`]).
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    crate::files::write_atomic(path, contents, mode).map_err(io_err(path))
}

/// Standard base64 of `bytes` (OpenSSH-style display of raw keys).
pub fn base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tempdir() -> PathBuf {
        let mut r = [0u8; 8];
        random_bytes(&mut r).unwrap();
        let p = std::env::temp_dir().join(format!("ephyr-keys-{}", BASE64URL_NOPAD.encode(&r)));
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn ensure_is_idempotent_and_force_replaces_only_the_ca() {
        let dir = tempdir();
        let first = ensure_keys(&dir, false).unwrap();
        assert_eq!((first.ca_key, first.sealing_key), (FileAction::Created, FileAction::Created));
        let seal_before = fs::read(KeyPaths::new(&dir).sealing_key()).unwrap();
        let again = ensure_keys(&dir, false).unwrap();
        assert_eq!((again.ca_key, again.sealing_key), (FileAction::Kept, FileAction::Kept));
        assert_eq!(first.ca_public_line, again.ca_public_line);
        let mode = fs::metadata(KeyPaths::new(&dir).ca_key()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let forced = ensure_keys(&dir, true).unwrap();
        assert_eq!(forced.ca_key, FileAction::Replaced);
        assert_ne!(forced.ca_public_line, first.ca_public_line);
        assert_eq!(fs::read(KeyPaths::new(&dir).sealing_key()).unwrap(), seal_before);
        let (ca, _) = load_keys(&dir).unwrap();
        assert_eq!(ca.public_line(), forced.ca_public_line);
        assert_eq!(read_ca_public_line(&dir).unwrap(), forced.ca_public_line);
        assert!(format!("{ca:?}").starts_with("CaKey(ssh-ed25519 "));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_keys_are_rejected_not_replaced() {
        let dir = tempdir();
        ensure_keys(&dir, false).unwrap();
        let p = KeyPaths::new(&dir);
        fs::write(p.sealing_key(), "ephyr-sealing-key-v1 short\n").unwrap();
        let err = ensure_keys(&dir, false).unwrap_err().to_string();
        assert!(err.contains("sealing_key") && err.contains("43 base64url"), "{err}");
        fs::write(p.ca_key(), "garbage").unwrap();
        let err = load_keys(&dir).unwrap_err().to_string();
        assert!(err.contains("not an OpenSSH private key"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
