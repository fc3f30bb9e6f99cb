//! Name patterns for grants (`web`, `web-*`, `*-prod`, `*`) and path patterns for services
//! (`/v1/*`, `/v1/models`).

use std::fmt;

/// A target/service/remote name or pattern with `*` at the start, the end, or alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// Names starting with this.
    Prefix(String),
    /// Names ending with this.
    Suffix(String),
    /// Every name.
    Any,
}

impl NamePattern {
    /// Parses a pattern; `*` may appear only alone, first or last, once.
    pub fn parse(s: &str) -> Result<NamePattern, String> {
        let stars = s.matches('*').count();
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@' | '/' | '*');
        if s.is_empty() || s.len() > 128 || !s.chars().all(ok_char) {
            return Err(format!("{s:?} is not a valid name or pattern"));
        }
        match (stars, s.strip_suffix('*'), s.strip_prefix('*')) {
            (0, _, _) => Ok(NamePattern::Exact(s.into())),
            (1, Some(""), _) => Ok(NamePattern::Any),
            (1, Some(p), _) => Ok(NamePattern::Prefix(p.into())),
            (1, _, Some(suf)) => Ok(NamePattern::Suffix(suf.into())),
            _ => Err(format!("{s:?}: '*' may appear once, alone or at the start or end")),
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(e) => e == name,
            NamePattern::Prefix(p) => name.starts_with(p.as_str()),
            NamePattern::Suffix(s) => name.ends_with(s.as_str()),
            NamePattern::Any => true,
        }
    }

    /// Higher is more specific (exact beats longer literal parts beats `*`).
    pub fn specificity(&self) -> usize {
        match self {
            NamePattern::Exact(_) => usize::MAX,
            NamePattern::Prefix(p) | NamePattern::Suffix(p) => p.len() + 1,
            NamePattern::Any => 0,
        }
    }

    /// Whether it contains a wildcard.
    pub fn is_wildcard(&self) -> bool {
        !matches!(self, NamePattern::Exact(_))
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(e) => f.write_str(e),
            NamePattern::Prefix(p) => write!(f, "{p}*"),
            NamePattern::Suffix(s) => write!(f, "*{s}"),
            NamePattern::Any => f.write_str("*"),
        }
    }
}

/// A service path pattern: an exact normalised path, or `/dir/*` for `/dir` and everything below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPattern {
    /// Exactly this path.
    Exact(String),
    /// This directory and everything below it (segment boundaries).
    Under(String),
}

impl PathPattern {
    /// Parses `/v1/*`, `/*` or an exact absolute path.
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        let normal = |p: &str| {
            p == "/"
                || (p.starts_with('/')
                    && p[1..].split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('*')))
        };
        if let Some(dir) = s.strip_suffix("/*") {
            let dir = if dir.is_empty() { "/" } else { dir };
            if normal(dir) {
                return Ok(PathPattern::Under(dir.into()));
            }
        } else if normal(s) {
            return Ok(PathPattern::Exact(s.into()));
        }
        Err(format!("{s:?}: a path pattern is an absolute normalised path, optionally ending in /*"))
    }

    /// A path this pattern matches (for "could anything here be allowed" checks).
    pub fn example(&self) -> &str {
        match self {
            PathPattern::Exact(p) | PathPattern::Under(p) => p,
        }
    }

    /// Whether a normalised `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            PathPattern::Under(d) => {
                d == "/" || path == d || (path.starts_with(d.as_str()) && path.as_bytes().get(d.len()) == Some(&b'/'))
            }
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Under(d) if d == "/" => f.write_str("/*"),
            PathPattern::Under(d) => write!(f, "{d}/*"),
        }
    }
}

/// Whole-text glob for command patterns: `*` matches any run of characters (none included);
/// everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let p = |s| NamePattern::parse(s).unwrap();
        assert!(p("web").matches("web") && !p("web").matches("web2"));
        assert!(p("web-*").matches("web-1") && !p("web-*").matches("db-1"));
        assert!(p("*-prod").matches("db-prod"));
        assert!(p("*").matches("anything"));
        assert!(p("web").specificity() > p("web-*").specificity());
        assert!(p("web-*").specificity() > p("w*").specificity());
        assert!(p("w*").specificity() > p("*").specificity());
        for bad in ["", "a*b", "**", "*a*", "a b", "é"] {
            assert!(NamePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_match_on_segment_boundaries() {
        let p = |s| PathPattern::parse(s).unwrap();
        assert!(p("/api/*").matches("/api") && p("/api/*").matches("/api/x/y"));
        assert!(!p("/api/*").matches("/apix"));
        assert!(p("/*").matches("/anything"));
        assert!(p("/v1/models").matches("/v1/models") && !p("/v1/models").matches("/v1/models/x"));
        for bad in ["api", "/api/..", "/api/../x/*", "/a//b", "/a*", "/a/*/b"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
