//! Build script: the commit `ephyr --version` names. `EPHYR_COMMIT` when set (release builds set
//! it, and a build from a tarball without `.git` can), else `git rev-parse --short=12 HEAD`, else
//! `unknown`. Nothing else is generated.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=EPHYR_COMMIT");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for f in ["HEAD", "refs/heads", "packed-refs"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
    }
    let commit = std::env::var("EPHYR_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EPHYR_COMMIT={commit}");
}
