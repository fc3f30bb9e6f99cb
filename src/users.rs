//! Local user lookups from `/etc/passwd` (and a numeric form), without NSS.
//!
//! What runs here: reads `/etc/passwd` once per lookup. A statically linked glibc binary cannot load
//! NSS modules, so parsing the file ourselves is both simpler and more predictable on an appliance.

use std::fmt;

/// A resolved account: numeric ids plus the name it was found under, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Name from `/etc/passwd`, or `None` for a bare numeric id.
    pub name: Option<String>,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n} (uid {}, gid {})", self.uid, self.gid),
            None => write!(f, "uid {} gid {}", self.uid, self.gid),
        }
    }
}

/// Parses one `/etc/passwd` text for `name`.
pub fn find_in_passwd(passwd: &str, name: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let n = f.next()?;
        if n != name {
            return None;
        }
        let _pw = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(Account { name: Some(n.to_owned()), uid, gid })
    })
}

/// Looks up `spec`: a user name from `/etc/passwd`, or `uid[:gid]` numbers (gid defaults to uid).
pub fn resolve(spec: &str) -> Result<Account, String> {
    if let Some((u, g)) = spec.split_once(':') {
        let uid = u.parse().map_err(|_| format!("{spec:?}: expected NAME, UID or UID:GID"))?;
        let gid = g.parse().map_err(|_| format!("{spec:?}: expected NAME, UID or UID:GID"))?;
        return Ok(Account { name: None, uid, gid });
    }
    if let Ok(uid) = spec.parse::<u32>() {
        return Ok(Account { name: None, uid, gid: uid });
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    find_in_passwd(&passwd, spec).ok_or_else(|| format!("no user {spec:?} in /etc/passwd"))
}

/// The name of `uid` in `/etc/passwd`, if it has one.
pub fn name_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let (n, _, u) = (f.next()?, f.next()?, f.next()?);
        (u.parse() == Ok(uid)).then(|| n.to_owned())
    })
}

/// Looks up `name` if it exists; `None` if it does not.
pub fn lookup(name: &str) -> Option<Account> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    find_in_passwd(&passwd, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_numbers() {
        let p = "root:x:0:0:root:/root:/bin/bash\nephyr:x:990:985::/var/lib/ephyr:/usr/sbin/nologin\n";
        assert_eq!(find_in_passwd(p, "ephyr"), Some(Account { name: Some("ephyr".into()), uid: 990, gid: 985 }));
        assert_eq!(find_in_passwd(p, "ephy"), None);
        assert_eq!(resolve("65533").unwrap(), Account { name: None, uid: 65533, gid: 65533 });
        assert_eq!(resolve("1000:100").unwrap(), Account { name: None, uid: 1000, gid: 100 });
        assert!(resolve("1000:x").is_err());
    }
}
