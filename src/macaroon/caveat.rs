//! The caveat language: parse and print one caveat. Strict and fail-closed.
//!
//! ```text
//! caveat  = KEY SP OP SP VALUE                       (single spaces, no leading/trailing space)
//! sets    : target | role | service | remote | tool   "IN [" name *("," name) "]"
//!           method                                    "IN [" METHOD *("," METHOD) "]"
//! time    : expires_before | not_before               "= " RFC 3339
//! flags   : can_delegate                              "= " ("true" | "false")
//!           delegation_depth                          "<= " 0..=255
//! lineage : task                                      "= " canonical ULID
//! meta    : agent | initiated_by                      "= " 1-128 printable characters
//! args    : "arg." argname  ( "prefix " /normal/abs/path
//!                           | "<= " non-negative decimal (no exponent, no sign)
//!                           | ">= " non-negative decimal
//!                           | "IN [" item *("," item) "]"
//!                           | "LIKE [" glob *("," glob) "]" )
//! name    = 1-128 of [A-Za-z0-9_.:@/-]     item = 1-128 printable, not space , [ ]
//! argname = 1-64 of [A-Za-z0-9_-]          METHOD = 1-16 of [A-Z]
//!         | JSON pointer: 1-128 of "/" seg, seg = 1-64 of [A-Za-z0-9_-] or "*" (every item)
//! glob    = item; "*" matches any run of characters, "?" one character
//! ```
//!
//! Lists are non-empty and may not repeat an item. Unknown keys, wrong operators, a caveat longer
//! than 1024 bytes and every other deviation are errors: a token with a caveat we cannot read
//! grants nothing.

use std::collections::BTreeSet;
use std::fmt;

use ulid::Ulid;

use crate::time::{UnixMicros, parse_rfc3339};

/// Longest caveat text.
pub const MAX_CAVEAT_LEN: usize = 1024;
/// Most items in one list.
pub const MAX_LIST_ITEMS: usize = 64;

/// A dimension restricted by a set caveat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKey {
    /// SSH targets.
    Target,
    /// SSH roles.
    Role,
    /// HTTP services.
    Service,
    /// Federated MCP servers.
    Remote,
    /// HTTP methods.
    Method,
    /// MCP tools (local and federated, `remote.tool`).
    Tool,
}

impl SetKey {
    /// Every set dimension.
    pub const ALL: [SetKey; 6] = [Self::Target, Self::Role, Self::Service, Self::Remote, Self::Method, Self::Tool];

    /// The caveat key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Target => "target",
            Self::Role => "role",
            Self::Service => "service",
            Self::Remote => "remote",
            Self::Method => "method",
            Self::Tool => "tool",
        }
    }
}

/// One parsed caveat.
#[derive(Clone, Debug, PartialEq)]
pub enum Caveat {
    /// `KEY IN [a,b]`.
    Set(SetKey, BTreeSet<String>),
    /// `expires_before = T`: valid only strictly before T.
    ExpiresBefore(UnixMicros),
    /// `not_before = T`: valid only from T on.
    NotBefore(UnixMicros),
    /// `can_delegate = true|false`.
    CanDelegate(bool),
    /// `delegation_depth <= n`: at most n more levels of delegation below this token's task.
    DelegationDepth(u8),
    /// `task = ULID`: the token passed through this task (the last one is the task it acts as).
    Task(Ulid),
    /// `agent = name` (metadata).
    Agent(String),
    /// `initiated_by = who` (metadata).
    InitiatedBy(String),
    /// An argument constraint.
    Arg(String, ArgConstraint),
}

/// A constraint on one argument of a tool call or proxy request.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgConstraint {
    /// A string that, as a normalised absolute path, is `path` or lies below it.
    Prefix(NormPath),
    /// A finite number, not negative, at most this.
    AtMost(f64),
    /// One of these strings.
    OneOf(BTreeSet<String>),
    /// A finite number, not negative, at least this.
    AtLeast(f64),
    /// A string matching one of these globs.
    Like(BTreeSet<String>),
}

/// A normalised absolute path: `/` or `/seg/seg`, no empty, `.` or `..` segments.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NormPath(String);

impl NormPath {
    /// Normalises `raw` lexically. Relative paths, NUL bytes and `..` above the root are refused.
    pub fn normalise(raw: &str) -> Option<NormPath> {
        if !raw.starts_with('/') || raw.contains('\0') {
            return None;
        }
        let mut segs: Vec<&str> = Vec::new();
        for seg in raw.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    segs.pop()?;
                }
                s => segs.push(s),
            }
        }
        Some(NormPath(format!("/{}", segs.join("/"))))
    }

    /// An argument path exactly as a tool will receive it, refused unless it has one reading:
    /// absolute; no `.`, `..` (or `..;`-style) or empty segments; no backslashes, no
    /// percent-encoded dots, slashes or backslashes (`%2e`, `%2f`, `%5c`); no control
    /// characters. One trailing `/` is allowed. Nothing is resolved: the server receives the
    /// same text and resolves it (symlinks included) itself, so what is checked is what it gets.
    pub fn strict(raw: &str) -> Result<NormPath, String> {
        let fail = |why: &str| Err(format!("{raw:?}: {why} (write the path plainly, absolute and normalised)"));
        if !raw.starts_with('/') {
            return fail("not an absolute path");
        }
        if raw.chars().any(char::is_control) {
            return fail("control characters are refused");
        }
        if raw.contains('\\') {
            return fail("backslashes are refused");
        }
        let lower = raw.to_ascii_lowercase();
        if ["%2e", "%2f", "%5c", "%00"].iter().any(|e| lower.contains(e)) {
            return fail("percent-encoded dots, slashes and backslashes are refused");
        }
        let body = if raw.len() > 1 { raw.strip_suffix('/').unwrap_or(raw) } else { raw };
        if body != "/" {
            for seg in body[1..].split('/') {
                if seg.is_empty() {
                    return fail("empty path segments (//) are refused");
                }
                if seg == "." || seg == ".." || seg.starts_with(".;") || seg.starts_with("..;") {
                    return fail("dot segments are refused");
                }
            }
        }
        Ok(NormPath(body.to_owned()))
    }

    /// Parses a path that must already be normal (as caveat values are).
    #[cfg(test)]
    fn parse_normal(raw: &str) -> Option<NormPath> {
        is_normal_path(raw).then(|| NormPath(raw.to_owned()))
    }

    /// Whether `other` is this path or lies below it (segment boundaries: `/data` never admits
    /// `/database`).
    pub fn contains(&self, other: &NormPath) -> bool {
        self.0 == "/" || other.0 == self.0 || (other.0.starts_with(&self.0) && other.0.as_bytes()[self.0.len()] == b'/')
    }

    /// The path text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated list in a caveat (`a,b,c` without the brackets), borrowed from the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Items<'a>(&'a str);

impl<'a> Items<'a> {
    /// The items, in caveat order.
    pub fn iter(self) -> impl Iterator<Item = &'a str> {
        self.0.split(',')
    }

    /// Whether `s` is one of them.
    pub fn contains(self, s: &str) -> bool {
        self.iter().any(|i| i == s)
    }

    /// Owned, sorted.
    pub fn to_set(self) -> BTreeSet<String> {
        self.iter().map(str::to_owned).collect()
    }
}

/// A parsed caveat borrowing from the token (the reducer's allocation-free view).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CaveatRef<'a> {
    /// `KEY IN [..]`.
    Set(SetKey, Items<'a>),
    /// `expires_before = T`.
    ExpiresBefore(UnixMicros),
    /// `not_before = T`.
    NotBefore(UnixMicros),
    /// `can_delegate = b`.
    CanDelegate(bool),
    /// `delegation_depth <= n`.
    DelegationDepth(u8),
    /// `task = ULID`.
    Task(Ulid),
    /// `agent = ..`.
    Agent(&'a str),
    /// `initiated_by = ..`.
    InitiatedBy(&'a str),
    /// `arg.NAME prefix P` (P already normal).
    ArgPrefix(&'a str, &'a str),
    /// `arg.NAME <= n`.
    ArgAtMost(&'a str, f64),
    /// `arg.NAME IN [..]`.
    ArgOneOf(&'a str, Items<'a>),
    /// `arg.NAME >= n`.
    ArgAtLeast(&'a str, f64),
    /// `arg.NAME LIKE [..]`.
    ArgLike(&'a str, Items<'a>),
}

/// Why a caveat did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaveatError(pub String);

impl fmt::Display for CaveatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CaveatError {}

fn bad(msg: impl Into<String>) -> CaveatError {
    CaveatError(msg.into())
}

/// Whether `p` is `/` or `/seg(/seg)*` with no empty, `.` or `..` segment and no NUL.
fn is_normal_path(p: &str) -> bool {
    p == "/"
        || (p.starts_with('/')
            && !p.contains('\0')
            && p[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."))
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
}

fn parse_list<'a>(key: &str, value: &'a str, item_ok: impl Fn(&str) -> bool) -> Result<Items<'a>, CaveatError> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| bad(format!("{key}: the list must be written [a,b,...]")))?;
    if inner.is_empty() {
        return Err(bad(format!(
            "{key}: empty list (a list grants its items; an empty one grants nothing, so it is refused)"
        )));
    }
    for (n, item) in inner.split(',').enumerate() {
        if n >= MAX_LIST_ITEMS {
            return Err(bad(format!("{key}: more than {MAX_LIST_ITEMS} items")));
        }
        if !item_ok(item) {
            return Err(bad(format!("{key}: invalid item {item:?}")));
        }
        // Lists are short (at most 64): a quadratic duplicate check allocates nothing.
        if inner.split(',').take(n).any(|earlier| earlier == item) {
            return Err(bad(format!("{key}: item {item:?} listed twice")));
        }
    }
    Ok(Items(inner))
}

/// Whether `v` may be the value of a metadata caveat (`agent = v`, `initiated_by = v`): at most
/// 128 printable ASCII characters or spaces (the grammar also refuses empty, leading or trailing
/// spaces).
pub fn metadata_value_ok(v: &str) -> bool {
    v.len() <= 128 && v.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

fn name_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(is_name_byte)
}

fn method_ok(s: &str) -> bool {
    (1..=16).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_uppercase())
}

/// An argument's name in a constraint: a top-level name, or a JSON pointer into the arguments
/// whose `*` segments stand for every item of an array (or member of an object).
pub fn arg_name_ok(name: &str) -> bool {
    let seg_ok = |s: &str| {
        s == "*"
            || ((1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    };
    match name.strip_prefix('/') {
        Some(rest) => name.len() <= 128 && rest.split('/').all(seg_ok),
        None => name != "*" && seg_ok(name),
    }
}

/// Whether `s` matches `glob`: `*` any run of characters (`/` included), `?` one character,
/// everything else itself.
pub fn glob_match(glob: &str, s: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), s.chars().collect());
    let (mut gi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(st) = star {
            gi = st + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

fn item_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'[' | b']'))
}

fn parse_number(key: &str, v: &str) -> Result<f64, CaveatError> {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (v, None),
    };
    let digits = |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int, 15) || frac.is_some_and(|f| !digits(f, 9)) {
        return Err(bad(format!("{key}: {v:?} is not a non-negative decimal number (digits, optional fraction)")));
    }
    v.parse::<f64>().map_err(|_| bad(format!("{key}: {v:?} is not a number")))
}

impl Caveat {
    /// Parses one caveat into an owned value.
    pub fn parse(text: &[u8]) -> Result<Caveat, CaveatError> {
        CaveatRef::parse(text).map(|c| c.into_owned())
    }
}

impl<'a> CaveatRef<'a> {
    /// The owned form.
    pub fn into_owned(self) -> Caveat {
        match self {
            CaveatRef::Set(k, items) => Caveat::Set(k, items.to_set()),
            CaveatRef::ExpiresBefore(t) => Caveat::ExpiresBefore(t),
            CaveatRef::NotBefore(t) => Caveat::NotBefore(t),
            CaveatRef::CanDelegate(b) => Caveat::CanDelegate(b),
            CaveatRef::DelegationDepth(n) => Caveat::DelegationDepth(n),
            CaveatRef::Task(t) => Caveat::Task(t),
            CaveatRef::Agent(a) => Caveat::Agent(a.into()),
            CaveatRef::InitiatedBy(a) => Caveat::InitiatedBy(a.into()),
            CaveatRef::ArgPrefix(n, p) => Caveat::Arg(n.into(), ArgConstraint::Prefix(NormPath(p.into()))),
            CaveatRef::ArgAtMost(n, v) => Caveat::Arg(n.into(), ArgConstraint::AtMost(v)),
            CaveatRef::ArgOneOf(n, items) => Caveat::Arg(n.into(), ArgConstraint::OneOf(items.to_set())),
            CaveatRef::ArgAtLeast(n, v) => Caveat::Arg(n.into(), ArgConstraint::AtLeast(v)),
            CaveatRef::ArgLike(n, items) => Caveat::Arg(n.into(), ArgConstraint::Like(items.to_set())),
        }
    }

    /// Parses one caveat, borrowing from `text`.
    pub fn parse(text: &'a [u8]) -> Result<CaveatRef<'a>, CaveatError> {
        if text.len() > MAX_CAVEAT_LEN {
            return Err(bad(format!("caveat longer than {MAX_CAVEAT_LEN} bytes")));
        }
        let text = std::str::from_utf8(text).map_err(|_| bad("caveat is not UTF-8"))?;
        let (key, rest) = text.split_once(' ').ok_or_else(|| bad(format!("{text:?}: expected 'key op value'")))?;
        let (op, value) = rest.split_once(' ').ok_or_else(|| bad(format!("{text:?}: expected 'key op value'")))?;
        if key.is_empty() || value.is_empty() || value.starts_with(' ') || value.ends_with(' ') {
            return Err(bad(format!("{text:?}: single spaces around the operator, no leading or trailing spaces")));
        }
        let want = |expected: &str| -> Result<(), CaveatError> {
            if op == expected { Ok(()) } else { Err(bad(format!("{key}: operator must be '{expected}', not '{op}'"))) }
        };
        let set_key = SetKey::ALL.into_iter().find(|k| k.as_str() == key);
        if let Some(k) = set_key {
            want("IN")?;
            let items =
                if k == SetKey::Method { parse_list(key, value, method_ok)? } else { parse_list(key, value, name_ok)? };
            return Ok(CaveatRef::Set(k, items));
        }
        match key {
            "expires_before" | "not_before" => {
                want("=")?;
                let t = parse_rfc3339(value).map_err(|e| bad(format!("{key}: {e}")))?;
                Ok(if key == "expires_before" { CaveatRef::ExpiresBefore(t) } else { CaveatRef::NotBefore(t) })
            }
            "can_delegate" => {
                want("=")?;
                match value {
                    "true" => Ok(CaveatRef::CanDelegate(true)),
                    "false" => Ok(CaveatRef::CanDelegate(false)),
                    _ => Err(bad(format!("can_delegate: {value:?} is not true or false"))),
                }
            }
            "delegation_depth" => {
                want("<=")?;
                if !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 3 {
                    return Err(bad(format!(
                        "delegation_depth: {value:?} is not a number 0-255 (negative depths are refused)"
                    )));
                }
                value
                    .parse::<u8>()
                    .map(CaveatRef::DelegationDepth)
                    .map_err(|_| bad(format!("delegation_depth: {value:?} exceeds 255")))
            }
            "task" => {
                want("=")?;
                let id = Ulid::from_string(value).map_err(|_| bad(format!("task: {value:?} is not a ULID")))?;
                let mut buf = [0u8; ulid::ULID_LEN];
                if id.array_to_str(&mut buf) != value {
                    return Err(bad(format!("task: {value:?} is not in canonical (upper-case) ULID form")));
                }
                Ok(CaveatRef::Task(id))
            }
            "agent" | "initiated_by" => {
                want("=")?;
                if !metadata_value_ok(value) {
                    return Err(bad(format!("{key}: 1-128 printable ASCII characters")));
                }
                Ok(if key == "agent" { CaveatRef::Agent(value) } else { CaveatRef::InitiatedBy(value) })
            }
            _ => {
                let Some(name) = key.strip_prefix("arg.") else {
                    return Err(bad(format!("unknown caveat key {key:?}")));
                };
                if !arg_name_ok(name) {
                    return Err(bad(format!(
                        "{key}: argument names are 1-64 of [A-Za-z0-9_-], or a JSON pointer such as /options/path or /paths/*"
                    )));
                }
                match op {
                    "prefix" => {
                        if !is_normal_path(value) {
                            return Err(bad(format!(
                                "{key}: {value:?} is not a normalised absolute path (no //, ., .. or trailing /)"
                            )));
                        }
                        Ok(CaveatRef::ArgPrefix(name, value))
                    }
                    "<=" => Ok(CaveatRef::ArgAtMost(name, parse_number(key, value)?)),
                    ">=" => Ok(CaveatRef::ArgAtLeast(name, parse_number(key, value)?)),
                    "IN" => Ok(CaveatRef::ArgOneOf(name, parse_list(key, value, item_ok)?)),
                    "LIKE" => Ok(CaveatRef::ArgLike(name, parse_list(key, value, item_ok)?)),
                    _ => Err(bad(format!("{key}: operator must be 'prefix', '<=', '>=', 'IN' or 'LIKE', not '{op}'"))),
                }
            }
        }
    }
}

impl fmt::Display for Caveat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |s: &BTreeSet<String>| s.iter().map(String::as_str).collect::<Vec<_>>().join(",");
        match self {
            Caveat::Set(k, items) => write!(f, "{} IN [{}]", k.as_str(), list(items)),
            Caveat::ExpiresBefore(t) => write!(f, "expires_before = {}", t.to_rfc3339()),
            Caveat::NotBefore(t) => write!(f, "not_before = {}", t.to_rfc3339()),
            Caveat::CanDelegate(b) => write!(f, "can_delegate = {b}"),
            Caveat::DelegationDepth(n) => write!(f, "delegation_depth <= {n}"),
            Caveat::Task(id) => write!(f, "task = {id}"),
            Caveat::Agent(a) => write!(f, "agent = {a}"),
            Caveat::InitiatedBy(a) => write!(f, "initiated_by = {a}"),
            Caveat::Arg(name, ArgConstraint::Prefix(p)) => write!(f, "arg.{name} prefix {}", p.as_str()),
            Caveat::Arg(name, ArgConstraint::AtMost(n)) => write!(f, "arg.{name} <= {n}"),
            Caveat::Arg(name, ArgConstraint::OneOf(items)) => write!(f, "arg.{name} IN [{}]", list(items)),
            Caveat::Arg(name, ArgConstraint::AtLeast(n)) => write!(f, "arg.{name} >= {n}"),
            Caveat::Arg(name, ArgConstraint::Like(items)) => write!(f, "arg.{name} LIKE [{}]", list(items)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Caveat {
        Caveat::parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        Caveat::parse(s.as_bytes()).expect_err(s).0
    }

    #[test]
    fn every_key_parses_and_prints_back() {
        for s in [
            "target IN [web,db]",
            "role IN [read]",
            "service IN [openai]",
            "remote IN [fs]",
            "method IN [GET,POST]",
            "tool IN [exec,fs.read_file]",
            "expires_before = 2030-01-01T00:00:00Z",
            "not_before = 2029-06-01T12:00:00Z",
            "can_delegate = false",
            "can_delegate = true",
            "delegation_depth <= 0",
            "delegation_depth <= 255",
            "task = 01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "agent = claude",
            "initiated_by = ephyr:apikey:claude",
            "arg.path prefix /data",
            "arg.path prefix /",
            "arg.amount <= 100",
            "arg.amount <= 2.5",
            "arg.region IN [eu-west-1,us-east-1]",
            "arg.steps >= 1",
            "arg.branch LIKE [feature/*,fix-?]",
            "arg./options/path prefix /data",
            "arg./paths/* prefix /data",
            "arg./edits/*/newText LIKE [*]",
        ] {
            let c = ok(s);
            // Lists print sorted, so compare reparsed values rather than texts.
            assert_eq!(Caveat::parse(c.to_string().as_bytes()).unwrap(), c, "{s}");
        }
    }

    #[test]
    fn malformed_forms_are_refused_with_reasons() {
        let cases = [
            ("target IN  [a]", "single spaces"),
            (" target IN [a]", "single spaces"),
            ("target IN [a] ", "single spaces"),
            ("target IN [a, b]", "invalid item"),
            ("target IN []", "empty list"),
            ("target IN [a,]", "invalid item"),
            ("target IN a,b", "must be written [a,b"),
            ("target IN [a,a]", "listed twice"),
            ("target = a", "operator must be 'IN'"),
            ("target IN [*]", "invalid item"),
            ("method IN [get]", "invalid item"),
            ("delegation_depth <= -3", "negative depths are refused"),
            ("delegation_depth <= 256", "exceeds 255"),
            ("delegation_depth = 3", "operator must be '<='"),
            ("can_delegate = yes", "not true or false"),
            ("can_delegate = TRUE", "not true or false"),
            ("expires_before = tomorrow", "expires_before"),
            ("task = 01arz3ndektsv4rrffq69g5fav", "canonical"),
            ("task = nope", "not a ULID"),
            ("agent =", "expected 'key op value'"),
            ("frobnicate = 1", "unknown caveat key"),
            ("Target IN [a]", "unknown caveat key"),
            ("arg. prefix /x", "argument names"),
            ("arg./ prefix /x", "argument names"),
            ("arg./a//b prefix /x", "argument names"),
            ("arg.* prefix /x", "argument names"),
            ("arg./a~1b prefix /x", "argument names"),
            ("arg./x/** prefix /x", "argument names"),
            ("arg.n >= -1", "non-negative decimal"),
            ("arg.b LIKE []", "empty list"),
            ("arg.b LIKE [a b]", "invalid item"),
            ("arg.path prefix data", "normalised absolute path"),
            ("arg.path prefix /data/", "normalised absolute path"),
            ("arg.path prefix /data/../etc", "normalised absolute path"),
            ("arg.path prefix /a//b", "normalised absolute path"),
            ("arg.n <= -1", "non-negative decimal"),
            ("arg.n <= NaN", "non-negative decimal"),
            ("arg.n <= inf", "non-negative decimal"),
            ("arg.n <= 1e3", "non-negative decimal"),
            ("arg.n < 5", "operator must be"),
            ("target", "expected 'key op value'"),
            ("", "expected 'key op value'"),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}");
        }
        let long = format!("target IN [{}]", "a".repeat(MAX_CAVEAT_LEN));
        assert!(err(&long).contains("longer than"));
        let many =
            format!("target IN [{}]", (0..=MAX_LIST_ITEMS).map(|i| format!("t{i}")).collect::<Vec<_>>().join(","));
        assert!(err(&many).contains("more than 64 items"));
        assert!(Caveat::parse(&[0xff, 0xfe]).unwrap_err().0.contains("UTF-8"));
    }

    #[test]
    fn paths_normalise_and_match_on_segment_boundaries() {
        let data = NormPath::parse_normal("/data").unwrap();
        let n = |s: &str| NormPath::normalise(s);
        assert!(data.contains(&n("/data").unwrap()));
        assert!(data.contains(&n("/data/x/y").unwrap()));
        assert!(data.contains(&n("/data/./x//y/").unwrap()));
        assert!(!data.contains(&n("/database").unwrap()));
        assert!(!data.contains(&n("/data/../etc/passwd").unwrap()));
        assert_eq!(n("/data/../../etc"), None, ".. above the root");
        assert_eq!(n("data/x"), None, "relative");
        assert_eq!(n("/data/\0x"), None);
        assert!(NormPath::parse_normal("/").unwrap().contains(&n("/anything").unwrap()));
    }

    #[test]
    fn globs_match_whole_strings() {
        for (g, t, want) in [
            ("feature/*", "feature/x/y", true),
            ("feature/*", "feature", false),
            ("fix-?", "fix-1", true),
            ("fix-?", "fix-12", false),
            ("*", "", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("*.txt", "/srv/a.txt", true),
            ("*.txt", "/srv/a.txt.sh", false),
            ("ab", "abc", false),
        ] {
            assert_eq!(glob_match(g, t), want, "{g} ~ {t}");
        }
    }

    #[test]
    fn argument_paths_with_more_than_one_reading_are_refused() {
        let ok = |s: &str| NormPath::strict(s).map(|p| p.0);
        assert_eq!(ok("/data/x.txt").unwrap(), "/data/x.txt");
        assert_eq!(ok("/data/dir/").unwrap(), "/data/dir", "one trailing slash");
        assert_eq!(ok("/").unwrap(), "/");
        assert_eq!(ok("/data/100%.txt").unwrap(), "/data/100%.txt", "a plain percent sign is a name");
        assert_eq!(ok("/data/..x/y..").unwrap(), "/data/..x/y..", "dots inside names are names");
        for bad in [
            "data/x",
            "/data/../etc/passwd",
            "/data/./x",
            "/data//x",
            "/data/%2e%2e/etc",
            "/data/%2E%2e/etc",
            "/data%2f..%2fetc",
            "/data/..%5cetc",
            "/data\\..\\etc",
            "/data/..;/etc",
            "/data/.;/x",
            "/data/x\0",
            "/data/x\n/y",
            "/data/%00",
            "/data/x//",
        ] {
            assert!(NormPath::strict(bad).is_err(), "{bad:?} accepted");
        }
        assert!(NormPath::strict("/data/../x").unwrap_err().contains("dot segments"));
    }
}
