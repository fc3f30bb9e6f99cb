//! The reducer: a caveat list becomes an [`Envelope`] (what the token allows), a lineage (the
//! tasks it passed through) and metadata. Deterministic, and monotone: appending a caveat can only
//! narrow.
//!
//! | caveat | rule |
//! |---|---|
//! | `target/role/service/remote/method/tool IN [..]` | the first sets the dimension, each later one intersects it; an empty intersection denies the dimension; no caveat = not constrained *by the token* (policy still applies) |
//! | `expires_before = T` | the earliest wins; valid while `now < T` |
//! | `not_before = T` | the latest wins; valid while `now >= T` |
//! | `can_delegate = b` | AND of all (default true) |
//! | `delegation_depth <= n` | the smallest wins |
//! | `task = ULID` | appended to the lineage; the token acts as the last one; the first must be the token's identifier |
//! | `agent`, `initiated_by` | metadata, the first value wins; never authority |
//! | `arg.N prefix P` | every prefix must hold (the value must lie under all of them) |
//! | `arg.N <= n` | the smallest wins |
//! | `arg.N IN [..]` | intersection |

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ulid::Ulid;

use super::caveat::{CaveatRef, Items, NormPath, SetKey};
use crate::time::UnixMicros;

/// One dimension of authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// The token says nothing about it (policy decides).
    Unconstrained,
    /// Only these names (empty = nothing).
    Only(BTreeSet<String>),
}

impl Dim {
    fn narrow(&mut self, items: Items<'_>) {
        match self {
            Dim::Unconstrained => *self = Dim::Only(items.to_set()),
            Dim::Only(set) => set.retain(|x| items.contains(x)),
        }
    }

    /// Whether `name` is allowed by this dimension.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Dim::Unconstrained => true,
            Dim::Only(set) => set.contains(name),
        }
    }

    /// Whether everything this allows, `other` allows too.
    pub fn is_subset_of(&self, other: &Dim) -> bool {
        match (self, other) {
            (_, Dim::Unconstrained) => true,
            (Dim::Unconstrained, Dim::Only(_)) => false,
            (Dim::Only(a), Dim::Only(b)) => a.is_subset(b),
        }
    }
}

/// Every constraint on one argument (all must hold).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArgRule {
    /// The value, as a normalised absolute path, must lie under each of these.
    pub prefixes: Vec<NormPath>,
    /// The value must be a finite, non-negative number no larger than this.
    pub at_most: Option<f64>,
    /// The value must be one of these strings.
    pub one_of: Option<BTreeSet<String>>,
    /// The value must be a finite, non-negative number no smaller than this.
    pub at_least: Option<f64>,
    /// The value must be a string matching a glob of each of these sets (one set per caveat
    /// or policy constraint: each narrows).
    pub like: Vec<BTreeSet<String>>,
}

impl ArgRule {
    fn add_prefix(&mut self, p: &str) {
        if !self.prefixes.iter().any(|q| q.as_str() == p) {
            self.prefixes.push(NormPath::normalise(p).expect("caveat paths are validated as normal"))
        }
    }

    fn add_at_most(&mut self, n: f64) {
        self.at_most = Some(self.at_most.map_or(n, |m| m.min(n)));
    }

    fn add_at_least(&mut self, n: f64) {
        self.at_least = Some(self.at_least.map_or(n, |m| m.max(n)));
    }

    fn add_like(&mut self, items: Items<'_>) {
        let set = items.to_set();
        if !self.like.contains(&set) {
            self.like.push(set);
        }
    }

    fn add_one_of(&mut self, items: Items<'_>) {
        match &mut self.one_of {
            None => self.one_of = Some(items.to_set()),
            Some(set) => set.retain(|x| items.contains(x)),
        }
    }

    /// Checks a JSON argument value. `Err` says why it is refused.
    pub fn check(&self, value: &serde_json::Value) -> Result<(), String> {
        if !self.prefixes.is_empty() {
            let s = value.as_str().ok_or("must be a string path")?;
            let p = NormPath::strict(s)?;
            if let Some(outside) = self.prefixes.iter().find(|q| !q.contains(&p)) {
                return Err(format!("{:?} is outside {}", p.as_str(), outside.as_str()));
            }
        }
        if self.at_most.is_some() || self.at_least.is_some() {
            let n = value
                .as_f64()
                .filter(|n| n.is_finite() && *n >= 0.0 && !value.is_string())
                .ok_or("must be a finite non-negative number")?;
            if let Some(max) = self.at_most
                && n > max
            {
                return Err(format!("{n} exceeds {max}"));
            }
            if let Some(min) = self.at_least
                && n < min
            {
                return Err(format!("{n} is below {min}"));
            }
        }
        for set in &self.like {
            let s = value.as_str().ok_or("must be a string")?;
            if !set.iter().any(|g| crate::macaroon::caveat::glob_match(g, s)) {
                return Err(format!("{s:?} matches none of the allowed patterns"));
            }
        }
        if let Some(set) = &self.one_of {
            let s = value.as_str().ok_or("must be a string")?;
            if !set.contains(s) {
                return Err(format!("{s:?} is not one of the allowed values"));
            }
        }
        Ok(())
    }

    /// Whether every value this rule accepts, `other` accepts too (a sound, conservative check).
    pub fn is_subset_of(&self, other: &ArgRule) -> bool {
        let prefixes = other.prefixes.iter().all(|q| self.prefixes.iter().any(|p| q.contains(p)));
        let max = match (self.at_most, other.at_most) {
            (_, None) => true,
            (Some(a), Some(b)) => a <= b,
            (None, Some(_)) => false,
        };
        let set = match (&self.one_of, &other.one_of) {
            (_, None) => true,
            (Some(a), Some(b)) => a.is_subset(b),
            (None, Some(_)) => false,
        };
        let min = match (self.at_least, other.at_least) {
            (_, None) => true,
            (Some(a), Some(b)) => a >= b,
            (None, Some(_)) => false,
        };
        // Each of `other`'s glob sets must be met by everything this rule accepts: a set of
        // ours made of globs it lists itself, or our allowed values all matching it.
        let like = other.like.iter().all(|theirs| {
            self.like.iter().any(|ours| ours.is_subset(theirs))
                || self.one_of.as_ref().is_some_and(|vals| {
                    vals.iter().all(|v| theirs.iter().any(|g| crate::macaroon::caveat::glob_match(g, v)))
                })
        });
        prefixes && max && set && min && like
    }
}

/// What a token allows (before intersecting with policy).
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    sets: [Dim; 6],
    /// Valid strictly before this instant.
    pub expires_before: Option<UnixMicros>,
    /// Valid from this instant on.
    pub not_before: Option<UnixMicros>,
    /// Whether the token may be used to delegate.
    pub can_delegate: bool,
    /// How many more levels of delegation below this token's task.
    pub delegation_depth: Option<u8>,
    /// Argument constraints by argument name.
    pub args: BTreeMap<String, ArgRule>,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            sets: std::array::from_fn(|_| Dim::Unconstrained),
            expires_before: None,
            not_before: None,
            can_delegate: true,
            delegation_depth: None,
            args: BTreeMap::new(),
        }
    }
}

/// Why a token is not valid at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeError {
    /// `now >= expires_before`.
    Expired(UnixMicros),
    /// `now < not_before`.
    NotYetValid(UnixMicros),
}

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeError::Expired(t) => write!(f, "token expired at {}", t.to_rfc3339()),
            TimeError::NotYetValid(t) => write!(f, "token is not valid before {}", t.to_rfc3339()),
        }
    }
}

impl Envelope {
    /// One set dimension.
    pub fn dim(&self, key: SetKey) -> &Dim {
        &self.sets[key as usize]
    }

    /// Checks the validity window at `now`.
    pub fn check_time(&self, now: UnixMicros) -> Result<(), TimeError> {
        if let Some(t) = self.expires_before.filter(|t| now >= *t) {
            return Err(TimeError::Expired(t));
        }
        if let Some(t) = self.not_before.filter(|t| now < *t) {
            return Err(TimeError::NotYetValid(t));
        }
        Ok(())
    }

    /// Whether everything this envelope allows, `other` allows too (dimension by dimension).
    pub fn is_subset_of(&self, other: &Envelope) -> bool {
        let sets = self.sets.iter().zip(&other.sets).all(|(a, b)| a.is_subset_of(b));
        let expiry = match (self.expires_before, other.expires_before) {
            (_, None) => true,
            (Some(a), Some(b)) => a <= b,
            (None, Some(_)) => false,
        };
        let start = match (self.not_before, other.not_before) {
            (_, None) => true,
            (Some(a), Some(b)) => a >= b,
            (None, Some(_)) => false,
        };
        let delegate = !self.can_delegate || other.can_delegate;
        let depth = match (self.delegation_depth, other.delegation_depth) {
            (_, None) => true,
            (Some(a), Some(b)) => a <= b,
            (None, Some(_)) => false,
        };
        let args = other.args.iter().all(|(name, r)| self.args.get(name).is_some_and(|mine| mine.is_subset_of(r)));
        sets && expiry && start && delegate && depth && args
    }

    /// A JSON view (for `ephyr inspect` and APIs).
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for k in SetKey::ALL {
            m.insert(
                format!("{}s", k.as_str()),
                match self.dim(k) {
                    Dim::Unconstrained => serde_json::Value::String("unconstrained".into()),
                    Dim::Only(s) => serde_json::json!(s),
                },
            );
        }
        m.insert("expires_before".into(), serde_json::json!(self.expires_before.map(|t| t.to_rfc3339())));
        m.insert("not_before".into(), serde_json::json!(self.not_before.map(|t| t.to_rfc3339())));
        m.insert("can_delegate".into(), serde_json::json!(self.can_delegate));
        m.insert("delegation_depth".into(), serde_json::json!(self.delegation_depth));
        let args: serde_json::Map<String, serde_json::Value> = self
            .args
            .iter()
            .map(|(n, r)| {
                (
                    n.clone(),
                    serde_json::json!({
                        "prefixes": r.prefixes.iter().map(NormPath::as_str).collect::<Vec<_>>(),
                        "at_most": r.at_most,
                        "one_of": r.one_of,
                    }),
                )
            })
            .collect();
        m.insert("args".into(), serde_json::Value::Object(args));
        serde_json::Value::Object(m)
    }
}

/// One task the token passed through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineageEntry {
    /// The task.
    pub task: Ulid,
    /// Index of its `task =` caveat.
    pub index: usize,
    /// SHA-256 of the chain signature right after that caveat (zero when not verified). The broker
    /// records it when it mints the task's token, so only tokens with exactly that prefix can act
    /// as the task.
    pub binding: [u8; 32],
}

/// The reducer's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduced {
    /// What the token allows.
    pub envelope: Envelope,
    /// Tasks in caveat order; the token acts as the last.
    pub lineage: Vec<LineageEntry>,
    /// `agent` metadata (first value).
    pub agent: Option<String>,
    /// `initiated_by` metadata (first value).
    pub initiated_by: Option<String>,
}

impl Reduced {
    /// The task the token acts as.
    pub fn task(&self) -> Option<Ulid> {
        self.lineage.last().map(|l| l.task)
    }
}

/// Why a caveat list does not reduce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReduceError {
    /// The caveat's position (0-based), if one caveat is at fault.
    pub index: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ReduceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "caveat {i}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for ReduceError {}

fn arg<'m>(args: &'m mut BTreeMap<String, ArgRule>, name: &str) -> &'m mut ArgRule {
    if !args.contains_key(name) {
        args.insert(name.to_owned(), ArgRule::default());
    }
    args.get_mut(name).expect("inserted above")
}

/// Folds caveats one at a time.
#[derive(Debug, Default)]
pub struct Reducer {
    out: Option<Reduced>,
    index: usize,
}

impl Reducer {
    /// Adds the next caveat; `binding` is the digest of the chain signature after it.
    pub fn push(&mut self, text: &[u8], binding: [u8; 32]) -> Result<(), ReduceError> {
        let index = self.index;
        self.index += 1;
        let c = CaveatRef::parse(text).map_err(|e| ReduceError { index: Some(index), reason: e.0 })?;
        let r = self.out.get_or_insert_with(|| Reduced {
            envelope: Envelope::default(),
            lineage: Vec::new(),
            agent: None,
            initiated_by: None,
        });
        let e = &mut r.envelope;
        match c {
            CaveatRef::Set(k, items) => e.sets[k as usize].narrow(items),
            CaveatRef::ExpiresBefore(t) => e.expires_before = Some(e.expires_before.map_or(t, |x| x.min(t))),
            CaveatRef::NotBefore(t) => e.not_before = Some(e.not_before.map_or(t, |x| x.max(t))),
            CaveatRef::CanDelegate(b) => e.can_delegate &= b,
            CaveatRef::DelegationDepth(n) => e.delegation_depth = Some(e.delegation_depth.map_or(n, |x| x.min(n))),
            CaveatRef::Task(task) => r.lineage.push(LineageEntry { task, index, binding }),
            CaveatRef::Agent(a) => {
                r.agent.get_or_insert_with(|| a.to_owned());
            }
            CaveatRef::InitiatedBy(a) => {
                r.initiated_by.get_or_insert_with(|| a.to_owned());
            }
            CaveatRef::ArgPrefix(name, p) => arg(&mut e.args, name).add_prefix(p),
            CaveatRef::ArgAtMost(name, n) => arg(&mut e.args, name).add_at_most(n),
            CaveatRef::ArgOneOf(name, items) => arg(&mut e.args, name).add_one_of(items),
            CaveatRef::ArgAtLeast(name, n) => arg(&mut e.args, name).add_at_least(n),
            CaveatRef::ArgLike(name, items) => arg(&mut e.args, name).add_like(items),
        }
        Ok(())
    }

    /// The result. `identifier` must be the first task of the lineage when `require_task` is set
    /// (ephyr tokens always name their root task first).
    pub fn finish(self, identifier: &[u8], require_task: bool) -> Result<Reduced, ReduceError> {
        let r = self.out.unwrap_or(Reduced {
            envelope: Envelope::default(),
            lineage: vec![],
            agent: None,
            initiated_by: None,
        });
        if require_task {
            let first =
                r.lineage.first().ok_or(ReduceError { index: None, reason: "the token names no task".into() })?;
            let mut buf = [0u8; ulid::ULID_LEN];
            if first.task.array_to_str(&mut buf).as_bytes() != identifier {
                return Err(ReduceError {
                    index: Some(first.index),
                    reason: "the first task caveat must name the root task (the token's identifier)".into(),
                });
            }
        }
        Ok(r)
    }
}

/// Reduces a caveat list without verifying the chain (for `ephyr inspect`).
pub fn reduce<'a>(caveats: impl IntoIterator<Item = &'a [u8]>) -> Result<Reduced, ReduceError> {
    let mut r = Reducer::default();
    for c in caveats {
        r.push(c, [0; 32])?;
    }
    r.finish(b"", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn red(cavs: &[&str]) -> Reduced {
        reduce(cavs.iter().map(|c| c.as_bytes())).unwrap()
    }

    fn set(items: &[&str]) -> Dim {
        Dim::Only(items.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn each_rule() {
        let r = red(&["target IN [a,b,c]", "target IN [c,b,x]"]);
        assert_eq!(r.envelope.dim(SetKey::Target), &set(&["b", "c"]));
        assert_eq!(r.envelope.dim(SetKey::Role), &Dim::Unconstrained);
        let r = red(&["role IN [a]", "role IN [b]"]);
        assert_eq!(r.envelope.dim(SetKey::Role), &set(&[]), "disjoint intersection denies the dimension");
        assert!(!r.envelope.dim(SetKey::Role).allows("a"));
        let r = red(&[
            "expires_before = 2030-01-01T00:00:00Z",
            "expires_before = 2029-01-01T00:00:00Z",
            "expires_before = 2031-01-01T00:00:00Z",
        ]);
        assert_eq!(r.envelope.expires_before.unwrap().to_rfc3339(), "2029-01-01T00:00:00Z");
        let r = red(&["not_before = 2029-01-01T00:00:00Z", "not_before = 2028-01-01T00:00:00Z"]);
        assert_eq!(r.envelope.not_before.unwrap().to_rfc3339(), "2029-01-01T00:00:00Z");
        assert!(red(&[]).envelope.can_delegate);
        assert!(!red(&["can_delegate = false", "can_delegate = true"]).envelope.can_delegate);
        assert_eq!(
            red(&["delegation_depth <= 5", "delegation_depth <= 2", "delegation_depth <= 9"]).envelope.delegation_depth,
            Some(2)
        );
        let r = red(&["agent = a", "agent = b", "initiated_by = x", "initiated_by = y"]);
        assert_eq!((r.agent.as_deref(), r.initiated_by.as_deref()), (Some("a"), Some("x")));
        let r = red(&["task = 01ARZ3NDEKTSV4RRFFQ69G5FAV", "task = 01BX5ZZKBKACTAV9WEVGEMMVRZ"]);
        assert_eq!(r.task().unwrap().to_string(), "01BX5ZZKBKACTAV9WEVGEMMVRZ");
        assert_eq!(r.lineage.len(), 2);
    }

    #[test]
    fn argument_rules() {
        let r = red(&[
            "arg.path prefix /data",
            "arg.path prefix /data/reports",
            "arg.n <= 100",
            "arg.n <= 50",
            "arg.r IN [a,b]",
            "arg.r IN [b,c]",
        ]);
        let path = &r.envelope.args["path"];
        assert!(path.check(&serde_json::json!("/data/reports/q3.csv")).is_ok());
        assert!(path.check(&serde_json::json!("/data/other")).unwrap_err().contains("outside /data/reports"));
        assert!(path.check(&serde_json::json!("/data/reports/../../etc/passwd")).is_err());
        assert!(path.check(&serde_json::json!("/datareports")).is_err());
        assert!(path.check(&serde_json::json!(5)).is_err());
        let n = &r.envelope.args["n"];
        assert!(n.check(&serde_json::json!(50)).is_ok());
        assert!(n.check(&serde_json::json!(50.5)).is_err());
        assert!(n.check(&serde_json::json!(-1)).is_err());
        assert!(n.check(&serde_json::json!("10")).is_err(), "strings fail");
        let rr = &r.envelope.args["r"];
        assert!(rr.check(&serde_json::json!("b")).is_ok());
        assert!(rr.check(&serde_json::json!("a")).is_err());
        // Disjoint prefixes accept nothing.
        let r = red(&["arg.p prefix /a", "arg.p prefix /b"]);
        assert!(r.envelope.args["p"].check(&serde_json::json!("/a/x")).is_err());
        assert!(r.envelope.args["p"].check(&serde_json::json!("/b/x")).is_err());
    }

    #[test]
    fn time_window() {
        let r = red(&["not_before = 2029-01-01T00:00:00Z", "expires_before = 2030-01-01T00:00:00Z"]);
        let t = |s: &str| crate::time::parse_rfc3339(s).unwrap();
        assert!(r.envelope.check_time(t("2029-06-01T00:00:00Z")).is_ok());
        assert!(matches!(r.envelope.check_time(t("2030-01-01T00:00:00Z")), Err(TimeError::Expired(_))));
        assert!(matches!(r.envelope.check_time(t("2028-12-31T23:59:59Z")), Err(TimeError::NotYetValid(_))));
    }

    #[test]
    fn the_first_task_must_be_the_identifier() {
        let mut red = Reducer::default();
        red.push(b"task = 01BX5ZZKBKACTAV9WEVGEMMVRZ", [0; 32]).unwrap();
        let e = red.finish(b"01ARZ3NDEKTSV4RRFFQ69G5FAV", true).unwrap_err();
        assert!(e.reason.contains("root task"), "{e}");
        assert!(Reducer::default().finish(b"x", true).unwrap_err().reason.contains("names no task"));
    }
}
