//! `ephyr isolate`: nftables rules that let agents running on the appliance as local users reach
//! the broker and nothing else on the network, so a target's sshd or an upstream API is reached
//! only through the broker (with its policy, audit and credentials).
//!
//! What runs here: the rules are generated from the policy's `agents.NAME.uid` and the uids and
//! gids given, printed, and with `--apply` loaded with `nft -f -` (replacing an earlier copy as
//! one transaction); `--remove` deletes them. Local sockets (the broker's Unix socket) are not
//! network traffic and stay usable.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The nftables table the rules live in.
pub const TABLE: &str = "ephyr_isolate";

/// Options.
#[derive(Debug, Default)]
pub struct IsolateOptions {
    /// A policy whose `agents.NAME.uid` are agents (optional).
    pub config: Option<PathBuf>,
    /// More agent uids.
    pub uids: Vec<u32>,
    /// Agent gids (every member's traffic).
    pub gids: Vec<u32>,
    /// The broker's TCP ports agents may reach on loopback (default 8554, the MCP/API listener).
    pub ports: Vec<u16>,
    /// Load the rules.
    pub apply: bool,
    /// Delete the rules.
    pub remove: bool,
}

/// The ruleset: agents' packets leave only to the broker's ports on loopback; anything else is
/// refused at once (a TCP reset, or ICMP administratively prohibited), so a program sees a clear
/// error instead of a timeout.
pub fn ruleset(uids: &BTreeSet<u32>, gids: &BTreeSet<u32>, ports: &BTreeSet<u16>) -> String {
    let list = |v: Vec<String>| v.join(", ");
    let mut out = format!(
        "# ephyr isolate: agents (uids {}; gids {}) reach only the broker (loopback ports {}).\n\
         # Remove with `ephyr isolate --remove` (nft delete table inet {TABLE}).\n\
         table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n",
        if uids.is_empty() { "none".into() } else { list(uids.iter().map(u32::to_string).collect()) },
        if gids.is_empty() { "none".into() } else { list(gids.iter().map(u32::to_string).collect()) },
        list(ports.iter().map(u16::to_string).collect()),
    );
    out.push_str("  chain output {\n    type filter hook output priority filter; policy accept;\n");
    if !uids.is_empty() {
        out.push_str(&format!("    meta skuid {{ {} }} jump agent\n", list(uids.iter().map(u32::to_string).collect())));
    }
    if !gids.is_empty() {
        out.push_str(&format!("    meta skgid {{ {} }} jump agent\n", list(gids.iter().map(u32::to_string).collect())));
    }
    out.push_str(&format!(
        "  }}\n  chain agent {{\n    oif \"lo\" tcp dport {{ {} }} accept\n    \
         meta l4proto tcp counter reject with tcp reset\n    counter reject with icmpx admin-prohibited\n  }}\n}}\n",
        list(ports.iter().map(u16::to_string).collect())
    ));
    out
}

fn nft(input: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft ({e}); install nftables"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Runs `ephyr isolate`; the exit code.
pub fn run(o: &IsolateOptions) -> Result<u8, String> {
    if o.apply && o.remove {
        return Err("--apply and --remove exclude each other".into());
    }
    if o.remove {
        // Create-then-delete: removing rules that are not there is not an error.
        nft(Some(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")), &["-f", "-"])?;
        println!("removed: table inet {TABLE}");
        return Ok(0);
    }
    let mut uids: BTreeSet<u32> = o.uids.iter().copied().collect();
    if let Some(path) = &o.config {
        let policy = crate::broker::policy::load_file(path).map_err(|e| format!("{}:\n{e}", path.display()))?;
        uids.extend(policy.agents.values().filter_map(|a| a.uid));
    }
    let gids: BTreeSet<u32> = o.gids.iter().copied().collect();
    if uids.is_empty() && gids.is_empty() {
        return Err(
            "no agent to isolate: give --uid UID or --gid GID, or a policy (--config) whose agents have `uid:`".into(),
        );
    }
    if uids.contains(&0) || gids.contains(&0) {
        return Err("uid or gid 0 is root (and the broker starts as root): it cannot be isolated as an agent".into());
    }
    let ports: BTreeSet<u16> = if o.ports.is_empty() { [8554].into() } else { o.ports.iter().copied().collect() };
    let rules = ruleset(&uids, &gids, &ports);
    if o.apply {
        nft(Some(&rules), &["-f", "-"])?;
        println!("applied: table inet {TABLE} (uids {uids:?}, gids {gids:?}, broker ports {ports:?})");
    } else {
        print!("{rules}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_sends_agents_to_the_broker_only() {
        let r = ruleset(&[1001, 1002].into(), &[2000].into(), &[8554].into());
        assert!(r.contains("meta skuid { 1001, 1002 } jump agent"), "{r}");
        assert!(r.contains("meta skgid { 2000 } jump agent"), "{r}");
        assert!(r.contains("oif \"lo\" tcp dport { 8554 } accept"), "{r}");
        assert!(r.contains("reject with tcp reset") && r.contains("reject with icmpx admin-prohibited"), "{r}");
        assert!(r.starts_with("# ephyr isolate") && r.contains("delete table inet ephyr_isolate\n"), "{r}");
        let only_uid = ruleset(&[7].into(), &BTreeSet::new(), &[1, 2].into());
        assert!(!only_uid.contains("skgid") && only_uid.contains("tcp dport { 1, 2 }"), "{only_uid}");
    }

    #[test]
    fn bad_input_is_named() {
        let none = IsolateOptions::default();
        assert!(run(&none).unwrap_err().contains("no agent to isolate"));
        let root = IsolateOptions { uids: vec![0], ..Default::default() };
        assert!(run(&root).unwrap_err().contains("root"));
        let both = IsolateOptions { uids: vec![5], apply: true, remove: true, ..Default::default() };
        assert!(run(&both).unwrap_err().contains("exclude"));
    }
}
