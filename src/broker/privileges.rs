//! Who the broker runs as, and the drop to that identity.
//!
//! What runs here: reads `/etc/passwd` (through `users`) and `/proc/self/status`; system calls
//! `prctl` (PR_CAPBSET_DROP, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS), `capset`, `setgroups`,
//! `setresgid`, `setresuid`. Called once, after the listeners are bound and the signer started,
//! before the executor runs.
//!
//! Started as root, the broker becomes its own unprivileged user (`ephyr` if present, else uid/gid
//! 65533), distinct from the signer's (`ephyr-signer` if present, else 65534 `nobody`), with every
//! capability set empty (its listeners are already bound, so it needs none, not even
//! CAP_NET_BIND_SERVICE), no_new_privs, and not dumpable (it holds root keys and credentials in
//! memory). Started as a normal user, it stays that user, says so, and still clears capabilities,
//! sets no_new_privs and turns off dumpability.

use crate::os;
use crate::users::{self, Account};

/// Default broker account name.
pub const BROKER_USER: &str = "ephyr";
/// Fallback broker ids when no `ephyr` user exists.
pub const BROKER_FALLBACK_ID: u32 = 65533;
/// Default signer account name.
pub const SIGNER_USER: &str = "ephyr-signer";
/// Fallback signer ids (`nobody`/`nogroup`).
pub const SIGNER_FALLBACK_ID: u32 = 65534;

/// The two identities a root-started broker uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identities {
    /// The broker's account after the drop.
    pub broker: Account,
    /// The signer's account after its drop.
    pub signer: Account,
}

/// Resolves `--broker-user` / `--signer-user` (or their defaults) and checks they differ.
pub fn resolve_identities(broker: Option<&str>, signer: Option<&str>) -> Result<Identities, String> {
    let pick = |spec: Option<&str>, default: &str, fallback: u32| -> Result<Account, String> {
        match spec {
            Some(s) => users::resolve(s),
            None => Ok(users::lookup(default).unwrap_or(Account { name: None, uid: fallback, gid: fallback })),
        }
    };
    let ids = Identities {
        broker: pick(broker, BROKER_USER, BROKER_FALLBACK_ID)?,
        signer: pick(signer, SIGNER_USER, SIGNER_FALLBACK_ID)?,
    };
    if ids.broker.uid == 0 || ids.signer.uid == 0 {
        return Err("the broker and signer users must not be root".into());
    }
    if ids.broker.uid == ids.signer.uid {
        return Err(format!(
            "the broker and the signer must run as different users (both resolve to uid {})",
            ids.broker.uid
        ));
    }
    Ok(ids)
}

/// Whether this process has effective uid 0.
pub fn is_root() -> bool {
    os::user_ids().1 == 0
}

/// What the drop did, for the start-up log and `/healthz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Final user id.
    pub uid: u32,
    /// Final group id.
    pub gid: u32,
    /// Whether we changed identity (started as root).
    pub changed_identity: bool,
}

/// Drops to `target` if root; in every case clears capabilities, sets no_new_privs and makes the
/// process non-dumpable, then verifies the result from `/proc/self/status`.
pub fn drop_privileges(target: Option<&Account>) -> Result<Dropped, String> {
    let root = is_root();
    if root {
        let t = target.ok_or("started as root but no broker user was resolved")?;
        caps::clear(None, caps::CapSet::Bounding).map_err(|e| format!("dropping the bounding set: {e}"))?;
        os::become_user(t.uid, t.gid).map_err(|e| format!("switching to {t}: {e}"))?;
    }
    for set in [caps::CapSet::Ambient, caps::CapSet::Inheritable, caps::CapSet::Effective, caps::CapSet::Permitted] {
        caps::clear(None, set).map_err(|e| format!("clearing {set:?}: {e}"))?;
    }
    os::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    os::set_not_dumpable().map_err(|e| format!("PR_SET_DUMPABLE: {e}"))?;
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    for field in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        let v = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).unwrap_or("?");
        if u64::from_str_radix(v.trim(), 16) != Ok(0) {
            return Err(format!("{field} is not empty after the drop ({})", v.trim()));
        }
    }
    let (_, uid, _) = os::user_ids();
    let (_, gid, _) = os::group_ids();
    if root && uid == 0 {
        return Err("still uid 0 after the drop".into());
    }
    Ok(Dropped { uid, gid, changed_identity: root })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_must_differ_and_not_be_root() {
        assert!(resolve_identities(Some("1000"), Some("1000")).unwrap_err().contains("different users"));
        assert!(resolve_identities(Some("0"), Some("1000")).unwrap_err().contains("must not be root"));
        let ids = resolve_identities(Some("2000"), Some("2001")).unwrap();
        assert_eq!((ids.broker.uid, ids.signer.uid), (2000, 2001));
    }
}
