//! Upstream credentials: where policy's secret references (`env:`, `file:`, `store:`) are read,
//! and the encrypted store behind `store:NAME`.
//!
//! What runs here: file reads and writes on the blocking pool; seal and unseal calls to the signer
//! (which alone holds the sealing key). The store is one file per secret,
//! `<data-dir>/state/secrets/<NAME>.sealed` (0600), written atomically (temporary file, fsync,
//! rename, directory fsync); its content is the signer's AEAD blob bound to the context
//! `ephyr-secret:v1:<NAME>`, so a blob renamed to another name does not open. Resolved values are
//! cached in memory (zeroized on drop) until the policy is reloaded or a secret is set or removed.
//! Values never appear in errors, logs or `Debug` output.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::Error;
use super::blocking::BlockingPool;
use super::policy::SecretRef;
use super::signer_client::Signer;
use crate::secret::SecretBytes;

/// Largest secret accepted (a PEM private key with its chain fits).
pub const MAX_SECRET: usize = 64 * 1024;

/// The signer's sealing context for a stored secret.
fn context(name: &str) -> String {
    format!("ephyr-secret:v1:{name}")
}

/// Whether `name` can name a stored secret: the rule the policy applies to `store:NAME`.
pub fn name_ok(name: &str) -> bool {
    super::policy::name_ok(name)
}

/// Drops one trailing newline (what `echo` and editors add); nothing else is changed.
pub fn trim_newline(mut v: Vec<u8>) -> Vec<u8> {
    if v.ends_with(b"\n") {
        v.pop();
        if v.ends_with(b"\r") {
            v.pop();
        }
    }
    v
}

/// Where the sealed secret `name` lives in the store `dir` (`<data-dir>/state/secrets`).
pub fn sealed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sealed"))
}

/// The secrets of one broker (executor thread only).
pub struct Secrets {
    dir: PathBuf,
    cache: RefCell<HashMap<String, SecretBytes>>,
}

impl Secrets {
    /// The store under `dir` (created on the first `set`).
    pub fn new(dir: PathBuf) -> Self {
        Secrets { dir, cache: RefCell::new(HashMap::new()) }
    }

    fn path(&self, name: &str) -> PathBuf {
        sealed_path(&self.dir, name)
    }

    /// Forgets every resolved value (policy reload: references may point elsewhere now).
    pub fn clear(&self) {
        self.cache.borrow_mut().clear();
    }

    /// The value behind a reference. Errors name the reference, never the value.
    /// `Err` is `Error::Unavailable`, naming the reference and what to do; never a value.
    pub async fn resolve(&self, pool: &BlockingPool, signer: &Signer, r: &SecretRef) -> Result<SecretBytes, Error> {
        self.resolve_text(pool, signer, r).await.map_err(Error::Unavailable)
    }

    async fn resolve_text(&self, pool: &BlockingPool, signer: &Signer, r: &SecretRef) -> Result<SecretBytes, String> {
        let key = r.to_string();
        if let Some(v) = self.cache.borrow().get(&key) {
            return Ok(v.clone());
        }
        let value = match r {
            SecretRef::Env(name) => match std::env::var_os(name) {
                Some(v) if !v.is_empty() => SecretBytes::new(std::os::unix::ffi::OsStringExt::into_vec(v)),
                _ => return Err(format!("secret {r}: the broker's environment has no {name} (or it is empty)")),
            },
            SecretRef::File(path) => {
                let p = PathBuf::from(path);
                let read = pool.run(move || read_limited(&p)).await.ok_or("the blocking pool is shut down")?;
                SecretBytes::new(trim_newline(read.map_err(|e| format!("secret {r}: {e}"))?))
            }
            SecretRef::Store(name) => {
                let p = self.path(name);
                let blob = pool.run(move || read_limited(&p)).await.ok_or("the blocking pool is shut down")?;
                let blob = blob.map_err(|e| {
                    if e.contains("No such file") {
                        format!("secret {r} is not set: run `ephyr secret set {name}` (it reads the value from stdin)")
                    } else {
                        format!("secret {r}: {e}")
                    }
                })?;
                signer
                    .unseal(context(name), blob)
                    .await
                    .map_err(|e| format!("secret {r} cannot be opened (sealed under another data dir's key?): {e}"))?
            }
        };
        if value.is_empty() {
            return Err(format!("secret {r} is empty"));
        }
        self.cache.borrow_mut().insert(key, value.clone());
        Ok(value)
    }

    /// Seals `value` and stores it as `name`, replacing any previous value.
    pub async fn set(&self, pool: &BlockingPool, signer: &Signer, name: &str, value: SecretBytes) -> Result<(), Error> {
        if !name_ok(name) {
            return Err(Error::Invalid(format!("{name:?} is not a secret name (1-64 of [A-Za-z0-9_.-])")));
        }
        if value.is_empty() {
            return Err(Error::Invalid("the secret is empty".into()));
        }
        if value.len() > MAX_SECRET {
            return Err(Error::Invalid(format!("the secret is longer than {MAX_SECRET} bytes")));
        }
        let blob = signer
            .seal(context(name), value)
            .await
            .map_err(|e| Error::Unavailable(format!("sealing: {}", e.message())))?;
        let (dir, path) = (self.dir.clone(), self.path(name));
        pool.run(move || write_atomic(&dir, &path, &blob))
            .await
            .ok_or_else(|| Error::Unavailable("the blocking pool is shut down".into()))?
            .map_err(|e| Error::Unavailable(format!("writing {}: {e}", self.path(name).display())))?;
        self.clear();
        Ok(())
    }

    /// Removes `name`; `Ok(false)` if it was not set.
    pub async fn remove(&self, pool: &BlockingPool, name: &str) -> Result<bool, Error> {
        if !name_ok(name) {
            return Err(Error::Invalid(format!("{name:?} is not a secret name")));
        }
        let (dir, path) = (self.dir.clone(), self.path(name));
        let removed = pool
            .run(move || match fs::remove_file(&path) {
                Ok(()) => File::open(&dir).and_then(|d| d.sync_all()).map(|()| true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            })
            .await
            .ok_or_else(|| Error::Unavailable("the blocking pool is shut down".into()))?
            .map_err(|e| Error::Unavailable(format!("removing {}: {e}", self.path(name).display())))?;
        self.clear();
        Ok(removed)
    }

    /// Names of stored secrets with their modification times (Unix seconds), sorted.
    pub fn list(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".sealed")?.to_owned();
                let mtime = e.metadata().ok()?.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
                Some((name, mtime))
            })
            .collect();
        out.sort();
        out
    }
}

/// Sealed records kept one per file under `dir` (the sign-ins to remotes,
/// `<data-dir>/state/remote-tokens/<key>.sealed`), each bound to `ephyr-remote-token:v1:<key>`
/// so that a file renamed to another key does not open.
pub struct SealedFiles {
    /// The directory (created on the first store, 0700).
    pub dir: PathBuf,
    /// For the file work.
    pub pool: BlockingPool,
    /// Seals and opens.
    pub signer: Signer,
}

impl SealedFiles {
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.sealed"))
    }
}

impl crate::broker::federation::auth::Vault for SealedFiles {
    fn load<'a>(&'a self, key: &'a str) -> crate::broker::ports::Local<'a, Result<Option<SecretBytes>, Error>> {
        Box::pin(async move {
            let p = self.path(key);
            let read = self
                .pool
                .run(move || match fs::metadata(&p) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    _ => read_limited(&p).map(Some),
                })
                .await
                .ok_or_else(|| Error::Unavailable("the blocking pool is shut down".into()))?
                .map_err(|e| Error::Unavailable(format!("sign-in {key:?}: {e}")))?;
            let Some(blob) = read else { return Ok(None) };
            let opened = self.signer.unseal(format!("ephyr-remote-token:v1:{key}"), blob).await.map_err(|e| {
                Error::Unavailable(format!(
                    "sign-in {key:?} cannot be opened (another data dir's, or forged): {}",
                    e.message()
                ))
            })?;
            Ok(Some(opened))
        })
    }

    fn store<'a>(
        &'a self,
        key: &'a str,
        value: Option<SecretBytes>,
    ) -> crate::broker::ports::Local<'a, Result<(), Error>> {
        Box::pin(async move {
            let (dir, path) = (self.dir.clone(), self.path(key));
            let blob = match value {
                Some(v) => Some(
                    self.signer
                        .seal(format!("ephyr-remote-token:v1:{key}"), v)
                        .await
                        .map_err(|e| Error::Unavailable(format!("sealing: {}", e.message())))?,
                ),
                None => None,
            };
            self.pool
                .run(move || match blob {
                    Some(b) => write_atomic(&dir, &path, &b),
                    None => match fs::remove_file(&path) {
                        Ok(()) => File::open(&dir).and_then(|d| d.sync_all()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(e),
                    },
                })
                .await
                .ok_or_else(|| Error::Unavailable("the blocking pool is shut down".into()))?
                .map_err(|e| Error::Unavailable(format!("writing sign-in {key:?}: {e}")))
        })
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_SECRET as u64 + 1024 {
        return Err(format!("{} is larger than {MAX_SECRET} bytes", path.display()));
    }
    fs::read(path).map_err(|e| e.to_string())
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    super::datadir::write_atomic(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_newlines() {
        assert!(name_ok("openai") && name_ok("gh.token_2") && !name_ok("") && !name_ok("../x"));
        assert!(!name_ok("a/b") && !name_ok(&"x".repeat(65)));
        assert_eq!(trim_newline(b"sk-1\n".to_vec()), b"sk-1");
        assert_eq!(trim_newline(b"sk-1\r\n".to_vec()), b"sk-1");
        assert_eq!(trim_newline(b"sk-1\n\n".to_vec()), b"sk-1\n", "only one newline is dropped");
        assert_eq!(trim_newline(b" sk-1 ".to_vec()), b" sk-1 ");
    }

    #[test]
    fn files_are_read_with_a_limit_and_written_atomically() {
        let dir = std::env::temp_dir().join(format!("ephyr-secrets-{}", std::process::id()));
        let store = dir.join("store");
        write_atomic(&store, &store.join("a.sealed"), b"blob").unwrap();
        assert_eq!(read_limited(&store.join("a.sealed")).unwrap(), b"blob");
        assert!(!store.join("a.sealed.tmp").exists());
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(store.join("a.sealed")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Secrets::new(store.clone()).list().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a"]);
        fs::write(dir.join("big"), vec![b'x'; MAX_SECRET + 2048]).unwrap();
        assert!(read_limited(&dir.join("big")).unwrap_err().contains("larger than"));
        assert!(read_limited(&dir.join("missing")).unwrap_err().contains("No such file"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
