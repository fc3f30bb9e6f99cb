//! `ephyr inspect`: decode a task token and show what it allows, without any key; with
//! `--root-key-file` it also verifies the chain.
//!
//! What runs here: reads the token from the command line or stdin and the optional key file;
//! `localtime_r` for the local-time display. Nothing is sent anywhere.

use crate::inspect;
use crate::macaroon::{Macaroon, RootKey};

/// Options of `ephyr inspect`.
#[derive(Debug, Default)]
pub struct InspectOptions {
    /// The token (`mac_...`), or `-` for stdin.
    pub token: String,
    /// Root key file (raw bytes) to verify with.
    pub root_key_file: Option<std::path::PathBuf>,
    /// JSON output.
    pub json: bool,
}

/// Runs `inspect`; returns an exit code (0 ok, 3 bad token or failed verification).
pub fn run(o: &InspectOptions) -> Result<i32, String> {
    let text = if o.token == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| format!("stdin: {e}"))?;
        s.trim().to_owned()
    } else {
        o.token.trim().to_owned()
    };
    let m = match Macaroon::decode(&text) {
        Ok(m) => m,
        Err(e) => {
            if o.json {
                println!("{}", serde_json::json!({ "valid_format": false, "error": e.to_string() }));
            } else {
                eprintln!("not a valid token: {e}");
            }
            return Ok(3);
        }
    };
    // The chain (needs the key) and the caveats (need none) are checked separately, so a valid
    // token with a caveat outside our grammar reads as exactly that.
    let verified = match &o.root_key_file {
        Some(path) => {
            let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(RootKey::from_bytes(&key).start(m.identifier()).verify_signature(&m).map_err(|e| e.to_string()))
        }
        None => None,
    };
    let d = inspect::describe(&m, text.len(), verified);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&d.json).unwrap_or_default());
    } else {
        print!("{}", d.text);
    }
    Ok(if d.bad { 3 } else { 0 })
}
