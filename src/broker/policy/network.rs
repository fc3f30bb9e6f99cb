//! Destination network rules for upstream connections (HTTP proxy, federation).
//!
//! Pure: the caller resolves names and passes every resolved address here. Defaults deny the
//! addresses an SSRF aims for — loopback, link-local (incl. 169.254.169.254 metadata), cloud
//! metadata IPv6, ULA, CGNAT, unspecified, multicast and broadcast — unless `network.allow`
//! names them explicitly. IPv4-mapped IPv6 (`::ffff:127.0.0.1`) is checked as IPv4.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8` or a single address.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv4-mapped IPv6 becomes IPv4; everything else is unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether `host` is a number-like name that resolvers read as an IPv4 address in a form other
/// than canonical dotted decimal (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`, `127.0.0.1.`).
/// Such names are refused wherever a host is accepted: what they mean depends on the resolver.
pub fn numeric_host_form(host: &str) -> bool {
    if host.parse::<Ipv4Addr>().is_ok() {
        return false;
    }
    let labels: Vec<&str> = host.strip_suffix('.').unwrap_or(host).split('.').collect();
    labels.iter().all(|l| {
        let hex = l.strip_prefix("0x").or_else(|| l.strip_prefix("0X"));
        match hex {
            Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
            None => !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()),
        }
    })
}

/// Blocks denied unless `network.allow` lists them, with the reason given to callers.
pub const DEFAULT_DENY: [(&str, &str); 14] = [
    ("0.0.0.0/8", "unspecified/this-network address"),
    ("127.0.0.0/8", "loopback address"),
    ("169.254.0.0/16", "link-local address (incl. the 169.254.169.254 metadata service)"),
    ("100.64.0.0/10", "carrier-grade NAT (CGNAT) address"),
    ("224.0.0.0/4", "multicast address"),
    ("240.0.0.0/4", "reserved or broadcast address"),
    ("192.0.0.0/24", "IETF protocol assignment (incl. NAT64 discovery)"),
    ("::/128", "unspecified address"),
    ("::1/128", "loopback address"),
    ("fe80::/10", "link-local address"),
    ("fd00:ec2::254/128", "cloud metadata address"),
    ("fc00::/7", "unique local address (ULA)"),
    ("ff00::/8", "multicast address"),
    ("64:ff9b::/96", "NAT64 address (could reach IPv4 internals)"),
];

/// The validated `network:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Explicitly allowed blocks (also lift default denials).
    pub allow: Vec<Cidr>,
    /// Explicitly denied blocks.
    pub deny: Vec<Cidr>,
}

impl NetworkPolicy {
    /// Whether the broker may connect to `ip`; `Err` says why not.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if let Some(c) = self.deny.iter().find(|c| c.contains(ip)) {
            return Err(format!("{ip} is in {c}, denied by network.deny"));
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        for (block, why) in DEFAULT_DENY {
            if Cidr::parse(block).expect("built-in CIDR").contains(ip) {
                return Err(format!("{ip} is a {why}; denied unless network.allow lists it"));
            }
        }
        if ip == IpAddr::V4(Ipv4Addr::BROADCAST) || ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            return Err(format!("{ip} is not a destination"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_denials_cover_ssrf_targets_in_every_form() {
        let n = NetworkPolicy::default();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
        ] {
            let e = n.check(ip.parse().unwrap()).unwrap_err();
            assert!(e.contains("denied") || e.contains("not a destination"), "{ip}: {e}");
        }
        for ip in ["8.8.8.8", "192.168.1.10", "10.0.0.5", "2001:db8::1"] {
            assert!(n.check(ip.parse().unwrap()).is_ok(), "{ip}");
        }
    }

    #[test]
    fn number_like_hosts_are_recognised() {
        for h in ["2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "127.0.0.1.", "017700000001", "0x"] {
            assert!(numeric_host_form(h), "{h}");
        }
        for h in ["127.0.0.1", "10.0.0.5", "example.com", "1password.com", "123.example", "api.v1", "::1"] {
            assert!(!numeric_host_form(h), "{h}");
        }
    }

    #[test]
    fn allow_lifts_and_deny_wins() {
        let n = NetworkPolicy {
            allow: vec![Cidr::parse("127.0.0.1/32").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()],
            deny: vec![Cidr::parse("10.9.0.0/16").unwrap()],
        };
        assert!(n.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(n.check("::ffff:127.0.0.1".parse().unwrap()).is_ok(), "mapped form follows the IPv4 rule");
        assert!(n.check("127.0.0.2".parse().unwrap()).is_err());
        assert!(n.check("10.9.1.1".parse().unwrap()).unwrap_err().contains("network.deny"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }
}
