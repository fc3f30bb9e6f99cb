//! The audit trail's recent lines as the console's views read them: the tail of the log (across
//! rotated files), parsed and filtered, on the blocking pool — a page never reads a whole file.
//!
//! What runs here: file reads on the blocking pool; the caller awaits them on the executor.

use serde_json::Value;

use crate::broker::Broker;

/// Bytes at the end of the audit log read for an agent's last activity.
pub const ACTIVITY_READ: u64 = 1 << 20;

/// The last `budget` bytes of a file, from its first whole line.
fn tail(path: &std::path::Path, budget: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(budget);
    f.seek(std::io::SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(budget).read_to_end(&mut buf)?;
    if start > 0 {
        let cut = buf.iter().position(|b| *b == b'\n').map_or(buf.len(), |i| i + 1);
        buf.drain(..cut);
    }
    Ok(buf)
}

/// The newest audit events matching `f` (at most `max`), from the last `budget` bytes of the
/// log (across rotated files), on the blocking pool: a page never reads a whole 64 MiB file.
pub async fn recent_events(
    broker: &Broker,
    f: crate::broker::audit::query::Filter,
    max: usize,
    budget: u64,
) -> Result<Vec<Value>, String> {
    let dir = broker.data_dir.audit();
    broker
        .pool
        .run(move || {
            let mut files = crate::broker::audit::log_files(&dir).map_err(|e| e.to_string())?;
            files.reverse();
            let (mut left, mut chosen) = (budget, Vec::new());
            for p in files {
                if left == 0 {
                    break;
                }
                let bytes = tail(&p, left).map_err(|e| format!("{}: {e}", p.display()))?;
                left = left.saturating_sub(bytes.len() as u64 + 1);
                chosen.push((p.display().to_string(), bytes));
            }
            chosen.reverse();
            let events = crate::broker::audit::query::parse_all(&chosen);
            let mut sel = crate::broker::audit::query::select(&events, &f);
            let skip = sel.len().saturating_sub(max);
            Ok(sel.split_off(skip))
        })
        .await
        .unwrap_or_else(|| Err("the blocking pool is gone".into()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tail_starts_at_a_whole_line() {
        let p = std::env::temp_dir().join(format!("ephyr-tail-{}", std::process::id()));
        std::fs::write(&p, b"{\"seq\":1}\n{\"seq\":2}\n{\"seq\":3}\n").unwrap();
        assert_eq!(super::tail(&p, 15).unwrap(), b"{\"seq\":3}\n", "the cut line is dropped");
        assert_eq!(super::tail(&p, 1000).unwrap().len(), 30);
        let _ = std::fs::remove_file(&p);
    }
}
