//! Durable file replacement: the one way the broker and the signer write a whole file.
//!
//! What runs here: blocking file system calls on the calling thread (callers on the executor use
//! the blocking pool): create a uniquely named temporary file beside the target (`O_EXCL`, the
//! given mode), write, `fsync`, `rename` over the target, `fsync` the directory. After a crash or
//! power loss the target holds either the old or the new contents, never a torn mix, and the
//! rename itself is durable (DESIGN.md invariant 10). The temporary file is removed on failure.
//!
//! Also here: cutting an append-only log (the audit log, a journal) back to the length it had
//! after its last synced write, when a later write failed part way.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Cuts the append-only file `f` back to `synced` bytes (what a failed write left after them
/// goes) and syncs it; the length it has now. A file shorter than that was changed by someone
/// else and is not ours to repair, unless it is empty and `new_file_ok` (a log rotated away).
pub fn cut_back(f: &std::fs::File, synced: u64, new_file_ok: bool) -> io::Result<u64> {
    let keep = match f.metadata()?.len() {
        len if len >= synced => synced,
        0 if new_file_ok => 0,
        len => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{len} bytes, less than the {synced} synced to it (changed by something else)"),
            ));
        }
    };
    f.set_len(keep)?;
    f.sync_all()?;
    Ok(keep)
}

/// Replaces `path` with `contents` atomically and durably, creating it with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut suffix = [0u8; 6];
    crate::secret::random_bytes(&mut suffix).map_err(io::Error::other)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        data_encoding::BASE64URL_NOPAD.encode(&suffix)
    ));
    let result = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn replaces_whole_files_with_the_mode_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("ephyr-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("HEAD");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        // A missing directory fails cleanly.
        assert!(write_atomic(&dir.join("nope/x"), b"x", 0o600).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
