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

/// A request path after normalisation: what policy checks and what is sent are the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalPath {
    /// The path as [`PathPattern`]s match it: percent-decoded, dot segments resolved, no empty
    /// segments; a trailing `/` is kept.
    pub decoded: String,
    /// The path as sent upstream: the same segments, still percent-encoded as the caller wrote them.
    pub encoded: String,
    /// The query string (without `?`), as given.
    pub query: Option<String>,
}

fn pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%".contains(&b)
}

/// Decodes `%XX` escapes; a malformed escape is an error naming the text.
pub fn percent_decode(seg: &str) -> Result<Vec<u8>, String> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => out.push(v),
                None => return Err(format!("path segment {seg:?} has a malformed percent escape")),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Whether a segment is a dot segment, also in the `..;param` form some servers accept.
fn dot_segment(seg: &[u8]) -> bool {
    let head = seg.split(|b| *b == b';').next().unwrap_or(seg);
    head == b"." || head == b".."
}

/// Normalises a request path (with an optional `?query`): `.` and `..` segments written plainly
/// are resolved (never above the root), empty segments dropped; anything whose meaning differs
/// between servers is refused: encoded dot segments (`%2e%2e`, `..;x`), encoded or raw
/// backslashes, NUL and control bytes, characters outside RFC 3986, a fragment. So `/api/..`
/// becomes `/` (which `/api/*` does not match) and `/api/%2e%2e/admin` is an error.
pub fn normalise_path(input: &str) -> Result<NormalPath, String> {
    let (path, query) = match input.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (input, None),
    };
    if input.contains('#') {
        return Err("a path cannot carry a fragment (#)".into());
    }
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with /"));
    }
    if let Some(q) = query
        && let Some(c) = q.bytes().find(|b| !pchar(*b) && *b != b'/' && *b != b'?')
    {
        return Err(format!("query has a character that must be percent-encoded: {:?}", char::from(c)));
    }
    if let Some(c) = path.bytes().find(|b| !pchar(*b) && *b != b'/') {
        return Err(format!("path has a character that must be percent-encoded: {:?}", char::from(c)));
    }
    let mut segs: Vec<(&str, String)> = Vec::new();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if seg == "." {
            continue;
        }
        if seg == ".." {
            if segs.pop().is_none() {
                return Err(format!("path {path:?} climbs above the root"));
            }
            continue;
        }
        let raw = seg.as_bytes();
        let decoded = percent_decode(seg)?;
        if dot_segment(raw) {
            return Err(format!("path segment {seg:?} is a dot segment with parameters"));
        }
        if decoded.iter().any(|b| *b == b'\\' || *b < 0x20 || *b == 0x7f) {
            return Err(format!("path segment {seg:?} decodes to a backslash or control character"));
        }
        if decoded.split(|b| *b == b'/').any(dot_segment) {
            return Err(format!("path segment {seg:?} hides a dot segment in percent-encoding"));
        }
        segs.push((seg, String::from_utf8_lossy(&decoded).into_owned()));
    }
    let trailing = path.len() > 1 && path.ends_with('/') && !segs.is_empty();
    let join = |f: &dyn Fn(&(&str, String)) -> String| {
        let mut s = String::with_capacity(path.len());
        for seg in &segs {
            s.push('/');
            s.push_str(&f(seg));
        }
        if segs.is_empty() || trailing {
            s.push('/');
        }
        s
    };
    Ok(NormalPath {
        decoded: join(&|(_, d)| d.clone()),
        encoded: join(&|(e, _)| (*e).to_owned()),
        query: query.map(str::to_owned),
    })
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

    #[test]
    fn paths_are_normalised_before_matching() {
        let n = |s| normalise_path(s).unwrap();
        let api = PathPattern::parse("/api/*").unwrap();
        assert_eq!(n("/api/..").decoded, "/");
        assert!(!api.matches(&n("/api/..").decoded), "/api/.. never matches /api/*");
        assert_eq!(n("/api/../admin").encoded, "/admin");
        assert_eq!(n("/api/./x//y/").encoded, "/api/x/y/");
        assert_eq!(n("/api/a%20b?x=1&y=%2F").decoded, "/api/a b");
        assert_eq!(n("/api/a%20b?x=1&y=%2F").encoded, "/api/a%20b");
        assert_eq!(n("/api/a%20b?x=1&y=%2F").query.as_deref(), Some("x=1&y=%2F"));
        assert_eq!(n("/repos/a%2Fb").decoded, "/repos/a/b", "an encoded slash stays inside its segment");
        assert_eq!(n("/repos/a%2Fb").encoded, "/repos/a%2Fb");
        assert_eq!(n("/").encoded, "/");
        for bad in [
            "/api/%2e%2e/admin",
            "/api/%2E%2E",
            "/api/.%2e/x",
            "/api/a%2F..%2Fb",
            "/api/..;/admin",
            "/api/x%5C..%5Cadmin",
            "/api/x\\y",
            "/api/%00",
            "/api/%0d%0aHost:x",
            "/api/%zz",
            "/api/a b",
            "/../etc",
            "/api#frag",
            "api",
            "/api?q=\"x\"",
        ] {
            assert!(normalise_path(bad).is_err(), "{bad:?}");
        }
    }
}
