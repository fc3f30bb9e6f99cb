//! Process log: one line per record on standard error, `<UTC time> <LEVEL> <module>: <message>`.
//!
//! What runs here: `write(2)` on fd 2 only, no files, no threads (the signer's seccomp list allows
//! `write`). The level comes from `EPHYR_LOG` (`error`, `warn`, `info`, `debug`, `trace`), default
//! `info`. Secrets are never passed to the logger: the types that hold them print `[redacted]`.

use std::io::Write;

struct StderrLogger {
    process: &'static str,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let target = record.target().strip_prefix("ephyr::").unwrap_or(record.target());
        let line = format!(
            "{} {:<5} {}[{}] {}: {}\n",
            crate::time::now().to_rfc3339_micros(),
            record.level(),
            self.process,
            std::process::id(),
            target,
            record.args()
        );
        // One write per record so lines from the broker and the signer do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger for this process. `process` names it in every line (`broker`, `signer`).
pub fn init(process: &'static str) {
    let level = match std::env::var("EPHYR_LOG").ok().as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger { process }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
