//! `policy.yaml` text → [`Policy`], collecting every problem with its location.
//!
//! Steps: YAML syntax (serde_yaml_ng, with line/column); top-level sections (unknown ones are
//! listed); each entry of each section deserialized on its own (`serde_path_to_error` gives the
//! exact key path of a type error or unknown field, `locate` its line); then semantic checks and
//! cross-references (roles, targets, templates, durations, URLs, CIDRs, hashes), and finally the
//! indexed [`Policy`] with templates merged.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::file::*;
use super::locate::locate;
use super::name_ok;
use super::network::{Cidr, NetworkPolicy};
use super::pattern::{NamePattern, PathPattern};
use super::*;
use crate::macaroon::caveat::NormPath;
use crate::signer::protocol::{HARD_MAX_CERT_TTL_SECS, KNOWN_EXTENSIONS, valid_principal};
use crate::time::parse_duration;

const SECTIONS: [&str; 17] = [
    "version",
    "operators",
    "approvals",
    "mcp",
    "limits",
    "global",
    "roles",
    "targets",
    "services",
    "remotes",
    "network",
    "templates",
    "agents",
    "runs",
    "lifecycle",
    "oauth",
    "$schema",
];
/// Largest Argon2 memory cost accepted for an API-key hash (64 MiB).
const MAX_ARGON2_KIB: u32 = 65_536;
/// Largest Argon2 time cost accepted.
const MAX_ARGON2_T: u32 = 10;
use super::HTTP_METHODS as METHODS;

/// Removes `field` from the mapping at `inside` (or from the mapping that `inside` ends in the
/// field itself); whether something was removed.
fn remove_key(v: &mut Value, inside: &[String], field: &str) -> bool {
    let mut cur = v;
    for seg in inside {
        if seg == field {
            break;
        }
        cur = match cur {
            Value::Mapping(m) => match m.get_mut(seg.as_str()) {
                Some(x) => x,
                None => return false,
            },
            Value::Sequence(list) => match seg.parse::<usize>().ok().and_then(|i| list.get_mut(i)) {
                Some(x) => x,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Mapping(m) => m.remove(field).is_some(),
        _ => false,
    }
}

struct Ctx<'t> {
    text: &'t str,
    origin: &'t str,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn at(&self, path: &[&str]) -> String {
        match locate(self.text, path) {
            Some((l, c)) => format!("{}:{l}:{c}", self.origin),
            None => self.origin.to_owned(),
        }
    }

    fn err(&mut self, path: &[&str], message: impl Into<String>, hint: Option<String>) {
        let at = self.at(path);
        self.problems.push(Problem { at, path: path.join("."), message: message.into(), hint });
    }

    fn warn(&mut self, path: &[&str], message: impl Into<String>) {
        let at = self.at(path);
        self.warnings.push(format!("{at}: {}: {}", path.join("."), message.into()));
    }

    /// Deserializes one entry, reporting the exact failing key. An unknown key is reported and
    /// dropped, and the rest of the entry is checked all the same (every problem in one pass).
    fn entry<T: DeserializeOwned>(&mut self, path: &[&str], v: &Value) -> Option<T> {
        let mut v = v.clone();
        for _ in 0..32 {
            match self.entry_once::<T>(path, &v) {
                Ok(t) => return Some(t),
                Err(Some((inner, field))) if remove_key(&mut v, &inner, &field) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// One attempt; on an unknown field, `Err(Some((path inside the entry, field)))` after
    /// reporting it.
    fn entry_once<T: DeserializeOwned>(
        &mut self,
        path: &[&str],
        v: &Value,
    ) -> Result<T, Option<(Vec<String>, String)>> {
        match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(t) => Ok(t),
            Err(e) => {
                let inner = e.path().to_string();
                let mut full: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                if inner != "." {
                    full.extend(inner.split('.').map(str::to_owned));
                }
                let msg = e.into_inner().to_string();
                // For an unknown field, point at the field itself.
                let field = msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()).map(str::to_owned);
                if let Some(f) = &field
                    && full.last() != Some(f)
                {
                    full.push(f.clone());
                }
                let refs: Vec<&str> = full.iter().map(String::as_str).collect();
                let hint = field.as_deref().map(unknown_key_hint);
                self.err(&refs, msg, hint);
                let inside: Vec<String> =
                    if inner == "." { Vec::new() } else { inner.split('.').map(str::to_owned).collect() };
                Err(field.map(|f| (inside, f)))
            }
        }
    }

    fn duration(&mut self, path: &[&str], v: Option<&str>, default: Duration) -> Duration {
        match v.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.err(path, e.to_string(), Some("durations look like 30s, 5m, 1h30m".into()));
                default
            }
        }
    }

    fn rate(&mut self, path: &[&str], v: Option<&str>, default: Rate) -> Rate {
        let Some(s) = v else { return default };
        let parsed =
            s.split_once('/').and_then(|(n, w)| Some((n.trim().parse::<u32>().ok()?, parse_duration(w).ok()?)));
        match parsed {
            Some((n, w)) if n > 0 && w.as_millis() >= 1000 => Rate { count: n, window: w },
            _ => {
                self.err(path, format!("{s:?} is not a rate"), Some("write COUNT/WINDOW, e.g. 600/1m".into()));
                default
            }
        }
    }
}

fn unknown_key_hint(field: &str) -> String {
    match field {
        "roles" => "targets list the roles they accept in allowed_roles; the roles themselves (with their principals) are defined under the top-level roles: section".into(),
        "api_key" => "store only the hash: run `ephyr keygen agent NAME` and paste its api_key_hash line".into(),
        "password" | "credential" | "token" => "secrets are never written in the policy: use credential: {type: bearer, secret: env:NAME | file:/path | store:NAME}".into(),
        _ => "check the spelling against docs/policy.md (or point your editor at docs/policy.schema.json)".into(),
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))?;
    num.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(mul))
}

fn parse_url(s: &str) -> Result<UpstreamUrl, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let scheme =
        uri.scheme_str().ok_or_else(|| format!("{s:?} needs a scheme (http:// or https://)"))?.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("{s:?}: only http and https upstreams are supported"));
    }
    let auth = uri.authority().ok_or_else(|| format!("{s:?} has no host"))?;
    if auth.as_str().contains('@') {
        return Err(format!("{s:?}: credentials in the URL are not allowed (use credential:)"));
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if super::network::numeric_host_form(&host) {
        return Err(format!("{s:?}: write an IPv4 address in dotted-decimal form, not {host:?}"));
    }
    if uri.query().is_some() {
        return Err(format!("{s:?}: a base URL has no query string"));
    }
    let port = auth.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    let normal = super::pattern::normalise_path(uri.path()).map_err(|e| format!("{s:?}: {e}"))?;
    if normal.encoded != uri.path() && normal.encoded != format!("{}/", uri.path()) {
        return Err(format!("{s:?}: write the base path normalised, as {:?}", normal.encoded));
    }
    let base_path = normal.encoded.trim_end_matches('/').to_owned();
    Ok(UpstreamUrl { scheme, host, port, base_path })
}

fn parse_secret_ref(s: &str) -> Result<SecretRef, String> {
    let hint = "secrets are referenced, never written here: env:NAME, file:/absolute/path or store:NAME";
    match s.split_once(':') {
        Some(("env", n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            Ok(SecretRef::Env(n.into()))
        }
        Some(("file", p)) if p.starts_with('/') => Ok(SecretRef::File(p.into())),
        Some(("store", n)) if name_ok(n) => Ok(SecretRef::Store(n.into())),
        _ => Err(format!("{s:?} is not a secret reference ({hint})")),
    }
}

fn header_name_ok(h: &str) -> bool {
    !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn credential(cx: &mut Ctx<'_>, path: &[&str], c: &CredentialFile) -> Option<Credential> {
    let mut p: Vec<&str> = path.to_vec();
    p.push("secret");
    let secret = match parse_secret_ref(&c.secret) {
        Ok(s) => s,
        Err(e) => {
            cx.err(&p, e, Some("store a value with `ephyr secret set NAME` and write store:NAME".into()));
            return None;
        }
    };
    p.pop();
    let kind = match c.kind.as_str() {
        "bearer" => CredentialKind::Bearer,
        "basic" => match &c.username {
            Some(u) if !u.is_empty() && !u.contains(':') => CredentialKind::Basic { username: u.clone() },
            _ => {
                cx.err(path, "basic credentials need a username (without ':')", None);
                return None;
            }
        },
        "header" => {
            let name = c.header.clone().unwrap_or_else(|| "Authorization".into());
            if !header_name_ok(&name) {
                cx.err(path, format!("{name:?} is not a valid header name"), None);
                return None;
            }
            CredentialKind::Header { name, prefix: c.prefix.clone().unwrap_or_default() }
        }
        "query" => {
            let param = c.param.clone().unwrap_or_else(|| "token".into());
            if param.is_empty() || !param.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) {
                cx.err(path, format!("{param:?} is not a valid query parameter name"), None);
                return None;
            }
            CredentialKind::Query { param }
        }
        other => {
            p.push("type");
            cx.err(&p, format!("unknown credential type {other:?}"), Some("use bearer, basic, header or query".into()));
            return None;
        }
    };
    Some(Credential { kind, secret })
}

/// `SHA256:` and 64 hex digits (colons allowed, as openssl prints them), or base64 of 32 bytes.
fn parse_fingerprint(f: &str) -> Option<[u8; 32]> {
    let body = f.strip_prefix("SHA256:").or_else(|| f.strip_prefix("sha256:")).unwrap_or(f);
    let hex: String = body.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let bytes = data_encoding::HEXLOWER
        .decode(hex.as_bytes())
        .ok()
        .or_else(|| data_encoding::BASE64.decode(body.as_bytes()).ok())
        .or_else(|| data_encoding::BASE64_NOPAD.decode(body.as_bytes()).ok())?;
    bytes.try_into().ok()
}

fn tls(cx: &mut Ctx<'_>, path: &[&str], t: Option<&TlsFile>) -> Tls {
    let Some(t) = t else { return Tls::default() };
    let key = t.client_key.as_deref().and_then(|k| match parse_secret_ref(k) {
        Ok(r) => Some(r),
        Err(e) => {
            let mut p = path.to_vec();
            p.extend(["tls", "client_key"]);
            cx.err(&p, e, None);
            None
        }
    });
    if t.client_cert.is_some() != t.client_key.is_some() {
        let mut p = path.to_vec();
        p.push("tls");
        cx.err(&p, "client_cert and client_key go together", None);
    }
    for f in [&t.ca_file, &t.client_cert].into_iter().flatten() {
        if !f.starts_with('/') {
            let mut p = path.to_vec();
            p.push("tls");
            cx.err(&p, format!("{f:?}: use an absolute path"), None);
        }
    }
    let fingerprint = t.fingerprint.as_deref().and_then(|f| match parse_fingerprint(f) {
        Some(d) => Some(d),
        None => {
            let mut p = path.to_vec();
            p.extend(["tls", "fingerprint"]);
            cx.err(
                &p,
                format!("{f:?} is not a SHA-256 certificate fingerprint"),
                Some("SHA256:<64 hex digits> (openssl x509 -noout -fingerprint -sha256 -in cert.pem)".into()),
            );
            None
        }
    });
    if fingerprint.is_some() && t.ca_file.is_some() {
        let mut p = path.to_vec();
        p.push("tls");
        cx.err(&p, "give ca_file or fingerprint, not both (a pinned certificate is trusted alone)", None);
    }
    Tls { ca_file: t.ca_file.clone(), client_cert: t.client_cert.clone(), client_key: key, fingerprint }
}

fn methods(cx: &mut Ctx<'_>, path: &[&str], list: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in list {
        let up = m.to_ascii_uppercase();
        if !METHODS.contains(&up.as_str()) {
            cx.err(path, format!("unknown HTTP method {m:?}"), Some(format!("use {}", METHODS.join(", "))));
        } else if up != *m {
            cx.err(path, format!("write HTTP methods in upper case: {up}"), None);
        } else {
            out.insert(up);
        }
    }
    out
}

fn path_patterns(cx: &mut Ctx<'_>, path: &[&str], list: &[String]) -> Vec<PathPattern> {
    let mut out = Vec::new();
    for p in list {
        match PathPattern::parse(p) {
            Ok(pp) => out.push(pp),
            Err(e) => cx.err(path, e, Some("e.g. /v1/* for /v1 and everything below, or an exact path".into())),
        }
    }
    out
}

fn ssh_key_line(cx: &mut Ctx<'_>, path: &[&str], s: &str) -> Option<String> {
    match ssh_key::PublicKey::from_openssh(s.trim()) {
        Ok(k) => Some(k.to_openssh().unwrap_or_else(|_| s.trim().to_owned())),
        Err(_) => {
            cx.err(
                path,
                "not an OpenSSH public key line",
                Some("paste the output of `ssh-keyscan -t ed25519 HOST` without the host name".into()),
            );
            None
        }
    }
}

struct Grantable<'a> {
    ssh: Option<&'a BTreeMap<String, SshGrantFile>>,
    services: Option<&'a BTreeMap<String, Option<ServiceGrantFile>>>,
    remotes: Option<&'a BTreeMap<String, Option<RemoteGrantFile>>>,
    dashboard: Option<&'a str>,
}

/// Validates one grant block (an agent's own or a template's) into the agent's tables.
#[allow(clippy::too_many_arguments)]
fn merge_grants(
    cx: &mut Ctx<'_>,
    base: &[&str],
    g: &Grantable<'_>,
    roles: &BTreeMap<String, Role>,
    targets: &BTreeMap<String, Target>,
    services: &BTreeMap<String, Service>,
    remotes: &BTreeMap<String, Remote>,
    agent: &mut Agent,
    dashboard_set: &mut bool,
) {
    let src = base.join(".");
    for (pat, grant) in g.ssh.into_iter().flatten() {
        let path: Vec<&str> = base.iter().copied().chain(["ssh", pat.as_str()]).collect();
        let pattern = match NamePattern::parse(pat) {
            Ok(p) => p,
            Err(e) => {
                cx.err(&path, e, None);
                continue;
            }
        };
        if grant.auto_approve == Some(false) {
            let mut p = path.clone();
            p.push("auto_approve");
            cx.err(
                &p,
                "pending approvals are not supported: ephyr decides from the policy alone",
                Some("remove auto_approve (true is accepted and means the same as leaving it out)".into()),
            );
        }
        if let NamePattern::Exact(t) = &pattern
            && !targets.contains_key(t)
        {
            cx.err(&path, format!("unknown target {t:?}"), Some(format!("targets defined: {}", join_keys(targets))));
            continue;
        }
        let mut rs = BTreeSet::new();
        for r in &grant.roles {
            let mut p = path.clone();
            p.push("roles");
            if !roles.contains_key(r) {
                cx.err(&p, format!("unknown role {r:?}"), Some(format!("roles defined: {}", join_keys(roles))));
                continue;
            }
            if let NamePattern::Exact(t) = &pattern {
                let allowed = &targets[t].allowed_roles;
                if !allowed.contains(r) {
                    cx.err(
                        &p,
                        format!("role {r:?} is not allowed on target {t:?}"),
                        Some(format!(
                            "targets.{t}.allowed_roles is [{}]",
                            allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                        )),
                    );
                    continue;
                }
            }
            rs.insert(r.clone());
        }
        agent.ssh.add(GrantEntry { pattern, value: rs, source: format!("{src}.ssh.{pat}") });
    }
    for (pat, grant) in g.services.into_iter().flatten() {
        let path: Vec<&str> = base.iter().copied().chain(["services", pat.as_str()]).collect();
        let pattern = match NamePattern::parse(pat) {
            Ok(p) => p,
            Err(e) => {
                cx.err(&path, e, None);
                continue;
            }
        };
        if let NamePattern::Exact(s) = &pattern
            && !services.contains_key(s)
        {
            cx.err(&path, format!("unknown service {s:?}"), Some(format!("services defined: {}", join_keys(services))));
            continue;
        }
        let default = ServiceGrantFile::default();
        let grant = grant.as_ref().unwrap_or(&default);
        let m = (!grant.methods.is_empty()).then(|| {
            let mut p = path.clone();
            p.push("methods");
            methods(cx, &p, &grant.methods)
        });
        let ps = (!grant.paths.is_empty()).then(|| {
            let mut p = path.clone();
            p.push("paths");
            path_patterns(cx, &p, &grant.paths)
        });
        agent.services.add(GrantEntry {
            pattern,
            value: ServiceGrant { methods: m, paths: ps },
            source: format!("{src}.services.{pat}"),
        });
    }
    for (pat, grant) in g.remotes.into_iter().flatten() {
        let path: Vec<&str> = base.iter().copied().chain(["remotes", pat.as_str()]).collect();
        let pattern = match NamePattern::parse(pat) {
            Ok(p) => p,
            Err(e) => {
                cx.err(&path, e, None);
                continue;
            }
        };
        if let NamePattern::Exact(r) = &pattern
            && !remotes.contains_key(r)
        {
            cx.err(&path, format!("unknown remote {r:?}"), Some(format!("remotes defined: {}", join_keys(remotes))));
            continue;
        }
        let default = RemoteGrantFile::default();
        let grant = grant.as_ref().unwrap_or(&default);
        let args_path: Vec<&str> = path.iter().copied().chain(["args"]).collect();
        let args = arg_rules(cx, &args_path, &grant.args);
        let mut tool_args = BTreeMap::new();
        for (tool, files) in &grant.tool_args {
            let p: Vec<&str> = path.iter().copied().chain(["tool_args", tool.as_str()]).collect();
            if !grant.tools.is_empty() && !grant.tools.iter().any(|t| crate::macaroon::caveat::glob_match(t, tool)) {
                cx.err(&p, format!("tool {tool:?} is not among the grant's tools"), None);
            }
            tool_args.insert(tool.clone(), arg_rules(cx, &p, files));
        }
        let tools: Option<BTreeSet<String>> = (!grant.tools.is_empty()).then(|| grant.tools.iter().cloned().collect());
        // A grant of the whole remote (no tools list) covers its resources and prompts too; a
        // grant of some tools covers only what it lists.
        let everything = || if tools.is_none() { vec!["*".to_owned()] } else { Vec::new() };
        let resources = grant.resources.clone().unwrap_or_else(everything);
        for r in &resources {
            if r.is_empty() || r.len() > 512 || r.chars().any(char::is_control) {
                let p: Vec<&str> = path.iter().copied().chain(["resources"]).collect();
                cx.err(
                    &p,
                    format!("{r:?} is not a URI pattern"),
                    Some("e.g. \"file:///srv/shared/*\" or \"*\"".into()),
                );
            }
        }
        let prompts = grant.prompts.clone().unwrap_or_else(everything).into_iter().collect();
        agent.remotes.add(GrantEntry {
            pattern,
            value: RemoteGrant { tools, deny_tools: grant.deny_tools.clone(), args, tool_args, resources, prompts },
            source: format!("{src}.remotes.{pat}"),
        });
    }
    if let Some(d) = g.dashboard
        && !*dashboard_set
    {
        match DashboardLevel::parse(d) {
            Some(l) => {
                agent.dashboard = l;
                *dashboard_set = true;
            }
            None => {
                let p: Vec<&str> = base.iter().copied().chain(["dashboard"]).collect();
                cx.err(
                    &p,
                    format!("unknown dashboard level {d:?}"),
                    Some("use none, viewer, operator or admin".into()),
                );
            }
        }
    }
}

/// Checks one agent's `api_key_hash`: the fast form (`ephyr-sha256$…`), or an Argon2id PHC
/// string within the cost bounds (with a warning: it costs ~25 ms and 19 MiB per check).
/// `operators:`: console accounts, each an Argon2id hash within the cost bounds and a role.
fn operators(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> BTreeMap<String, Operator> {
    let mut out = BTreeMap::new();
    for (name, v) in section(cx, top, "operators") {
        if !name_ok(&name) {
            cx.err(&["operators", &name], "operator names are 1-64 of [A-Za-z0-9_.-]", None);
            continue;
        }
        let Some(f) = cx.entry::<OperatorFile>(&["operators", &name], v) else { continue };
        let at = ["operators", name.as_str(), "password_hash"];
        let fix = || Some(format!("run `ephyr operator add {name}` and paste its lines"));
        match argon2::password_hash::phc::PasswordHash::new(&f.password_hash) {
            Ok(ph) if ph.algorithm.as_str() == "argon2id" => {
                if let Err(e) = argon2_cost(&ph) {
                    cx.err(&at, e, fix());
                    continue;
                }
            }
            _ => {
                cx.err(&at, "not an Argon2id PHC hash ($argon2id$v=19$...)", fix());
                continue;
            }
        }
        let role = match f.role.as_deref() {
            None | Some("viewer") => OperatorRole::Viewer,
            Some("admin") => OperatorRole::Admin,
            Some(other) => {
                cx.err(
                    &["operators", &name, "role"],
                    format!("unknown role {other:?}"),
                    Some("viewer or admin".into()),
                );
                continue;
            }
        };
        out.insert(name.clone(), Operator { name, password_hash: f.password_hash, role });
    }
    out
}

/// `approvals:`: rules (each covering exactly one kind of action, naming approvers that exist),
/// notification targets and the console's URL.
fn approvals(
    cx: &mut Ctx<'_>,
    top: &serde_yaml_ng::Mapping,
    known: &Known<'_>,
    operators: &BTreeMap<String, Operator>,
) -> approval::Approvals {
    use approval::{ApprovalRule, Approver, Covers, Notifier, NotifyKind};
    let mut out = approval::Approvals::default();
    let Some(v) = top.get("approvals").filter(|v| !v.is_null()) else { return out };
    let Some(f) = cx.entry::<ApprovalsFile>(&["approvals"], v) else { return out };
    if let Some(u) = &f.console_url {
        match parse_url(u) {
            Ok(url) if url.base_path.is_empty() => out.console_url = Some(u.trim_end_matches('/').to_owned()),
            Ok(_) => cx.err(&["approvals", "console_url"], "give the console's origin only (https://host:port)", None),
            Err(e) => cx.err(&["approvals", "console_url"], e, None),
        }
    }
    out.hold = cx.duration(&["approvals", "hold"], f.hold.as_deref(), out.hold);
    if out.hold > Duration::from_secs(120) {
        cx.err(&["approvals", "hold"], "at most 2m (clients time out; a progress token holds longer)", None);
    }
    if let Some(n) = f.max_pending_per_agent {
        if n == 0 || n > 1000 {
            cx.err(&["approvals", "max_pending_per_agent"], "between 1 and 1000", None);
        }
        out.max_pending_per_agent = n.clamp(1, 1000);
    }
    for (name, n) in &f.notify {
        let at = ["approvals", "notify", name.as_str()];
        if !name_ok(name) {
            cx.err(&at, "names are 1-64 of [A-Za-z0-9_.-]", None);
        }
        let (kind, url) = match (&n.webhook, &n.ntfy) {
            (Some(u), None) => (NotifyKind::Webhook, u),
            (None, Some(u)) => (NotifyKind::Ntfy, u),
            _ => {
                cx.err(&at, "give exactly one of webhook: URL or ntfy: URL", None);
                continue;
            }
        };
        let url = match parse_url(url) {
            Ok(u) => u,
            Err(e) => {
                cx.err(&at, e, None);
                continue;
            }
        };
        let token = match n.token.as_deref().map(parse_secret_ref) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                cx.err(&["approvals", "notify", name, "token"], e, None);
                continue;
            }
        };
        out.notify.insert(name.clone(), Notifier { name: name.clone(), kind, url, token });
    }
    for (name, r) in &f.rules {
        let at = ["approvals", "rules", name.as_str()];
        if !name_ok(name) {
            cx.err(&at, "rule names are 1-64 of [A-Za-z0-9_.-]", None);
            continue;
        }
        let sub = |k: &'static str| -> Vec<&str> { vec!["approvals", "rules", name.as_str(), k] };
        let globs = |cx: &mut Ctx<'_>, k: &'static str, list: &[String], known: &dyn Fn(&str) -> bool| {
            if list.is_empty() {
                cx.err(&sub(k), "list at least one name or pattern (* for all)", None);
            }
            for p in list {
                if p.is_empty() || p.len() > 128 || p.chars().any(char::is_control) {
                    cx.err(&sub(k), format!("{p:?} is not a name or pattern"), None);
                } else if !p.contains(['*', '?']) && !known(p) {
                    cx.warn(&sub(k), format!("{p:?} names nothing in this policy"));
                }
            }
            list.to_vec()
        };
        let kinds = [r.ssh.is_some(), r.http.is_some(), r.remote.is_some(), r.delegate.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            cx.err(&at, "a rule covers exactly one of ssh:, http:, remote: or delegate:", None);
            continue;
        }
        let on = if let Some(s) = &r.ssh {
            let targets = globs(cx, "ssh", &s.targets, &|t| known.targets.contains_key(t));
            let roles = match &s.roles {
                Some(l) => globs(cx, "ssh", l, &|x| known.roles.contains_key(x)),
                None => Vec::new(),
            };
            let commands = match &s.commands {
                Some(l) => globs(cx, "ssh", l, &|_| true),
                None => Vec::new(),
            };
            Covers::Ssh { targets, roles, commands }
        } else if let Some(h) = &r.http {
            let services = globs(cx, "http", &h.services, &|s| known.services.contains_key(s));
            let methods = h.methods.as_ref().map(|m| methods(cx, &sub("http"), m));
            let paths = h.paths.as_ref().map(|p| path_patterns(cx, &sub("http"), p));
            Covers::Http { services, methods, paths }
        } else if let Some(m) = &r.remote {
            let remotes = globs(cx, "remote", &m.remotes, &|x| known.remotes.contains_key(x));
            let tools = match &m.tools {
                Some(l) => globs(cx, "remote", l, &|_| true),
                None => Vec::new(),
            };
            let mut p = sub("remote");
            p.push("when");
            let when = arg_rules(cx, &p, &m.when);
            Covers::Remote { remotes, tools, when }
        } else if let Some(d) = &r.delegate {
            Covers::Delegate { to: globs(cx, "delegate", &d.to, &|_| true) }
        } else {
            continue;
        };
        let agents = match &r.agents {
            Some(l) => globs(cx, "agents", l, &|_| true),
            None => Vec::new(),
        };
        let mut approvers = Vec::new();
        for a in r.approvers.clone().unwrap_or_else(|| vec!["role:admin".into(), "local".into()]) {
            let parsed = match a.as_str() {
                "local" => Some(Approver::Local),
                "role:admin" => Some(Approver::Role(OperatorRole::Admin)),
                "role:viewer" => Some(Approver::Role(OperatorRole::Viewer)),
                n if operators.contains_key(n) => Some(Approver::Operator(n.to_owned())),
                n => {
                    cx.err(
                        &sub("approvers"),
                        format!("{n:?} is not an operator of this policy"),
                        Some("operator names from operators:, role:admin, role:viewer or local".into()),
                    );
                    None
                }
            };
            approvers.extend(parsed);
        }
        if r.approvers.as_ref().is_some_and(Vec::is_empty) {
            cx.err(&sub("approvers"), "name at least one approver", None);
        }
        let timeout = cx.duration(&sub("timeout"), r.timeout.as_deref(), Duration::from_secs(900));
        if timeout.is_zero() || timeout > Duration::from_secs(86_400) {
            cx.err(&sub("timeout"), "between 1s and 24h", None);
        }
        let waiver = r.waiver.as_deref().map(|w| cx.duration(&sub("waiver"), Some(w), Duration::ZERO));
        if waiver.is_some_and(|w| w.is_zero() || w > Duration::from_secs(86_400)) {
            cx.err(&sub("waiver"), "between 1s and 24h", None);
        }
        let four_eyes = r.four_eyes.unwrap_or(false);
        if four_eyes && approvers.len() == 1 && matches!(approvers[0], Approver::Operator(_)) {
            cx.err(&sub("four_eyes"), "four eyes needs two different approvers; this rule names one", None);
        }
        out.rules.insert(
            name.clone(),
            ApprovalRule { name: name.clone(), agents, on, approvers, timeout, four_eyes, waiver },
        );
    }
    out
}

/// Each verification runs an Argon2 hash's cost on a small appliance: bound it so a typo cannot
/// exhaust memory or stall sign-ins (API keys and operator passwords alike).
fn argon2_cost(ph: &argon2::password_hash::phc::PasswordHash) -> Result<(), String> {
    let m = ph.params.get_decimal("m").unwrap_or(0);
    let t = ph.params.get_decimal("t").unwrap_or(0);
    let p = ph.params.get_decimal("p").unwrap_or(0);
    if m > MAX_ARGON2_KIB || t > MAX_ARGON2_T || p > 4 {
        return Err(format!("Argon2 cost m={m},t={t},p={p} exceeds m={MAX_ARGON2_KIB},t={MAX_ARGON2_T},p=4"));
    }
    Ok(())
}

fn api_key_hash(cx: &mut Ctx<'_>, name: &str, h: &str) {
    use super::key_hash;
    let at = ["agents", name, "api_key_hash"];
    let fix = || Some(format!("run `ephyr keygen agent {name}` and paste the new api_key_hash line"));
    if h.starts_with(key_hash::FAST_PREFIX) {
        if let Err(e) = key_hash::parse_fast(h) {
            cx.err(&at, format!("not a valid ephyr-sha256 hash: {e}"), fix());
        }
        return;
    }
    if h.starts_with("$2") {
        cx.err(&at, "bcrypt hashes (Go Ephyr) are not accepted", fix());
        return;
    }
    match argon2::password_hash::phc::PasswordHash::new(h) {
        Ok(ph) if ph.algorithm.as_str() == "argon2id" => {
            if let Err(e) = argon2_cost(&ph) {
                cx.err(&at, e, fix());
            } else {
                cx.warn(
                    &at,
                    "is Argon2id: each uncached check costs ~25 ms and 19 MiB; for a key made by `ephyr keygen` the broker logs the ephyr-sha256 line to paste instead at its first use (docs/policy.md, \"API keys\")",
                );
            }
        }
        Ok(ph) => cx.err(&at, format!("algorithm {} is not argon2id", ph.algorithm), fix()),
        Err(_) => cx.err(
            &at,
            "neither ephyr-sha256$<id>$<digest> nor an Argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash)",
            fix(),
        ),
    }
}

fn join_keys<T>(m: &BTreeMap<String, T>) -> String {
    if m.is_empty() { "(none)".into() } else { m.keys().cloned().collect::<Vec<_>>().join(", ") }
}

fn section<'v>(cx: &mut Ctx<'_>, top: &'v serde_yaml_ng::Mapping, name: &str) -> Vec<(String, &'v Value)> {
    match top.get(name) {
        None | Some(Value::Null) => vec![],
        Some(Value::Mapping(m)) => m
            .iter()
            .filter_map(|(k, v)| match k.as_str() {
                Some(k) => Some((k.to_owned(), v)),
                None => {
                    cx.err(&[name], format!("keys under {name} must be names (strings), found {k:?}"), None);
                    None
                }
            })
            .collect(),
        Some(_) => {
            cx.err(&[name], format!("{name} must be a mapping of names to entries"), None);
            vec![]
        }
    }
}

/// Parses and validates.
/// Limits (ours) or Go's global: one section of the policy, validated.
fn limits(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> Limits {
    let limits_file: LimitsFile = top.get("limits").and_then(|v| cx.entry(&["limits"], v)).unwrap_or_default();
    let global: Option<GlobalFile> = top.get("global").and_then(|v| cx.entry(&["global"], v));
    if top.contains_key("limits") && top.contains_key("global") {
        cx.err(
            &["global"],
            "use limits: or global:, not both",
            Some("global: is read for Go Ephyr compatibility; move its keys into limits:".into()),
        );
    }
    let g = global.unwrap_or_default();
    if top.contains_key("global") {
        cx.warn(&["global"], "Go Ephyr section read as limits: (max_active_certs → max_certs_total, default_ttl → cert_ttl_default, max_ttl → cert_ttl_max, rate_limit → requests_per_agent)");
    }
    let go_rate = g.rate_limit.as_ref().and_then(|r| {
        if r.requests_per_window <= 0 || r.window_seconds <= 0 {
            cx.err(
                &["global", "rate_limit"],
                "requests_per_window and window_seconds must be positive (ephyr has no 'disabled' rate limit)",
                None,
            );
            None
        } else {
            Some(format!("{}/{}s", r.requests_per_window, r.window_seconds))
        }
    });
    let cert_ttl_max = cx.duration(
        &["limits", "cert_ttl_max"],
        limits_file.cert_ttl_max.as_deref().or(g.max_ttl.as_deref()),
        Duration::from_secs(1800),
    );
    if cert_ttl_max.as_secs() == 0 || cert_ttl_max.as_secs() > u64::from(HARD_MAX_CERT_TTL_SECS) {
        cx.err(
            &["limits", "cert_ttl_max"],
            format!(
                "is {}, outside 1s..{} (the signer's hard cap)",
                crate::time::format_duration(cert_ttl_max),
                crate::time::format_duration(Duration::from_secs(u64::from(HARD_MAX_CERT_TTL_SECS)))
            ),
            None,
        );
    }
    let cert_ttl_default = cx.duration(
        &["limits", "cert_ttl_default"],
        limits_file.cert_ttl_default.as_deref().or(g.default_ttl.as_deref()),
        Duration::from_secs(300).min(cert_ttl_max),
    );
    if cert_ttl_default > cert_ttl_max {
        cx.err(
            &["limits", "cert_ttl_default"],
            format!(
                "is {}, above limits.cert_ttl_max ({})",
                crate::time::format_duration(cert_ttl_default),
                crate::time::format_duration(cert_ttl_max)
            ),
            None,
        );
    }
    let task_ttl_max =
        cx.duration(&["limits", "task_ttl_max"], limits_file.task_ttl_max.as_deref(), Duration::from_secs(3600));
    let task_ttl_default = cx.duration(
        &["limits", "task_ttl_default"],
        limits_file.task_ttl_default.as_deref(),
        Duration::from_secs(1800).min(task_ttl_max),
    );
    if task_ttl_default > task_ttl_max {
        cx.err(&["limits", "task_ttl_default"], "must not exceed task_ttl_max", None);
    }
    let limits = Limits {
        cert_ttl_default,
        cert_ttl_max,
        max_certs_per_agent: limits_file.max_certs_per_agent.unwrap_or(10),
        max_certs_total: limits_file.max_certs_total.or(g.max_active_certs).unwrap_or(100),
        requests_per_agent: cx.rate(
            &["limits", "requests_per_agent"],
            limits_file.requests_per_agent.as_deref().or(go_rate.as_deref()),
            Rate { count: 600, window: Duration::from_secs(60) },
        ),
        signer_rate: cx.rate(
            &["limits", "signer_rate"],
            limits_file.signer_rate.as_deref(),
            Rate { count: 600, window: Duration::from_secs(60) },
        ),
        task_ttl_max,
        task_ttl_default,
        delegation_depth_max: limits_file.delegation_depth_max.unwrap_or(5),
        bind_deadline: cx.duration(
            &["limits", "bind_deadline"],
            limits_file.bind_deadline.as_deref(),
            Duration::from_secs(30),
        ),
        host_key_strict: limits_file.host_key_strict.or(g.host_key_strict).unwrap_or(false),
        recordings_max_size: match limits_file.recordings_max_size.as_deref().map(parse_size) {
            None => 256 << 20,
            Some(Some(n)) if n >= 1 << 20 => n,
            _ => {
                cx.err(&["limits", "recordings_max_size"], "a size of at least 1MiB, like 256MiB or 2GiB", None);
                256 << 20
            }
        },
        recordings_max_files: match limits_file.recordings_max_files {
            None => 10_000,
            Some(n) if n >= 1 => n,
            Some(_) => {
                cx.err(&["limits", "recordings_max_files"], "at least 1", None);
                10_000
            }
        },
        file_max_size: match limits_file.file_max_size.as_deref().map(parse_size) {
            None => 1 << 20,
            Some(Some(n)) if (1..=64 << 20).contains(&n) => n,
            _ => {
                cx.err(&["limits", "file_max_size"], "a size from 1 byte to 64MiB, like 1MiB", None);
                1 << 20
            }
        },
        session_idle: {
            let d =
                cx.duration(&["limits", "session_idle"], limits_file.session_idle.as_deref(), Duration::from_secs(300));
            if !(Duration::from_secs(10)..=Duration::from_secs(86_400)).contains(&d) {
                cx.err(&["limits", "session_idle"], "from 10s to 24h", None);
            }
            d
        },
        session_max: limits_file.session_max.as_deref().map(|v| {
            let d = cx.duration(&["limits", "session_max"], Some(v), Duration::from_secs(86_400));
            if !(Duration::from_secs(10)..=Duration::from_secs(7 * 86_400)).contains(&d) {
                cx.err(&["limits", "session_max"], "from 10s to 7d", None);
            }
            d
        }),
        output_max: match limits_file.output_max.as_deref().map(parse_size) {
            None => 1 << 20,
            Some(Some(n)) if (1024..=64 << 20).contains(&n) => n as usize,
            _ => {
                cx.err(&["limits", "output_max"], "a size from 1KiB to 64MiB, like 1MiB", None);
                1 << 20
            }
        },
    };
    if limits.delegation_depth_max > 32 {
        cx.err(&["limits", "delegation_depth_max"], "at most 32 levels", None);
    }

    limits
}

/// Roles: one section of the policy, validated.
fn roles(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> BTreeMap<String, Role> {
    let mut roles = BTreeMap::new();
    for (name, v) in section(cx, top, "roles") {
        if !name_ok(&name) {
            cx.err(&["roles", &name], "role names are 1-64 of [A-Za-z0-9_.-]", None);
        }
        let Some(r) = cx.entry::<RoleFile>(&["roles", &name], v) else { continue };
        if !valid_principal(&r.principal) {
            cx.err(
                &["roles", &name, "principal"],
                format!("{:?} is not a valid user name", r.principal),
                Some("letters, digits, '_', '-', '.', at most 32, not starting with '-'".into()),
            );
        }
        if let Some(sh) = &r.shell
            && !sh.starts_with('/')
        {
            cx.err(&["roles", &name, "shell"], "the shell must be an absolute path", None);
        }
        let sudo = match r.sudo {
            None | Some(SudoFile::All(false)) => Sudo::None,
            Some(SudoFile::All(true)) => Sudo::All,
            Some(SudoFile::Commands(c)) => {
                if c.iter().any(|x| x.trim().is_empty()) {
                    cx.err(&["roles", &name, "sudo"], "sudo commands must not be empty", None);
                }
                Sudo::Commands(c)
            }
        };
        let commands = match crate::command::CommandPolicy::compile(r.commands.as_ref(), &[], &[]) {
            Ok(c) => c,
            Err((key, msg)) => {
                cx.err(&["roles", &name, "commands", key], msg, None);
                None
            }
        };
        roles.insert(
            name,
            Role {
                principal: r.principal,
                commands,
                description: r.description.unwrap_or_default(),
                shell: r.shell,
                sudo,
                system: r.system.unwrap_or(true),
            },
        );
    }

    roles
}

/// Targets: one section of the policy, validated.
fn targets(
    cx: &mut Ctx<'_>,
    top: &serde_yaml_ng::Mapping,
    limits: &Limits,
    roles: &BTreeMap<String, Role>,
) -> BTreeMap<String, Target> {
    let mut targets = BTreeMap::new();
    let mut endpoints: BTreeMap<(String, u16), String> = BTreeMap::new();
    for (name, v) in section(cx, top, "targets") {
        if !name_ok(&name) {
            cx.err(&["targets", &name], "target names are 1-64 of [A-Za-z0-9_.-]", None);
        }
        let Some(t) = cx.entry::<TargetFile>(&["targets", &name], v) else { continue };
        if t.host.trim().is_empty() || t.host.contains(char::is_whitespace) {
            cx.err(&["targets", &name, "host"], "must be a host name or IP address", None);
        }
        let port = match t.port {
            None => 22,
            Some(n) if (1..=65535).contains(&n) => n as u16,
            Some(n) => {
                cx.err(&["targets", &name, "port"], format!("port {n} is out of range (1-65535)"), None);
                22
            }
        };
        if let Some(other) = endpoints.insert((t.host.to_ascii_lowercase(), port), name.clone()) {
            cx.err(&["targets", &name, "host"], format!("{}:{port} is already target {other:?}", t.host), None);
        }
        let mut allowed = BTreeSet::new();
        for r in &t.allowed_roles {
            if roles.contains_key(r) {
                allowed.insert(r.clone());
            } else {
                cx.err(
                    &["targets", &name, "allowed_roles"],
                    format!("unknown role {r:?}"),
                    Some(format!("define it under roles: (roles defined: {})", join_keys(roles))),
                );
            }
        }
        let mut pin = HostKeyPin::default();
        if let Some(k) = &t.host_key {
            pin.key = ssh_key_line(cx, &["targets", &name, "host_key"], k);
        }
        if let Some(fp) = &t.host_key_fingerprint {
            match fp.parse::<ssh_key::Fingerprint>() {
                Ok(f) if f.algorithm() == ssh_key::HashAlg::Sha256 => {
                    if let Some(k) = pin.key.as_deref().and_then(|k| ssh_key::PublicKey::from_openssh(k).ok())
                        && k.fingerprint(ssh_key::HashAlg::Sha256) != f
                    {
                        cx.err(&["targets", &name, "host_key_fingerprint"], "does not match host_key", None);
                    }
                    pin.fingerprint = Some(f.to_string());
                }
                _ => cx.err(
                    &["targets", &name, "host_key_fingerprint"],
                    format!("{fp:?} is not a SHA256:... fingerprint"),
                    Some("ssh-keygen -lf <(ssh-keyscan HOST) prints it".into()),
                ),
            }
        }
        if let Some(ca) = &t.host_ca {
            pin.ca = ssh_key_line(cx, &["targets", &name, "host_ca"], ca);
        }
        if limits.host_key_strict && !pin.is_set() {
            cx.err(
                &["targets", &name],
                "limits.host_key_strict requires a host_key, host_key_fingerprint or host_ca",
                None,
            );
        }
        let max = cx.duration(
            &["targets", &name, "cert_ttl_max"],
            t.cert_ttl_max.as_deref().or(t.max_ttl.as_deref()),
            limits.cert_ttl_max,
        );
        if max > limits.cert_ttl_max {
            cx.err(
                &["targets", &name, if t.cert_ttl_max.is_some() { "cert_ttl_max" } else { "max_ttl" }],
                format!(
                    "is {}, above limits.cert_ttl_max ({})",
                    crate::time::format_duration(max),
                    crate::time::format_duration(limits.cert_ttl_max)
                ),
                None,
            );
        }
        let def = cx.duration(
            &["targets", &name, "cert_ttl_default"],
            t.cert_ttl_default.as_deref(),
            limits.cert_ttl_default.min(max),
        );
        if def > max {
            cx.err(
                &["targets", &name, "cert_ttl_default"],
                format!(
                    "is {}, above this target's cert_ttl_max ({})",
                    crate::time::format_duration(def),
                    crate::time::format_duration(max)
                ),
                None,
            );
        }
        // Go files write `force_command: ""` for "none".
        let force_command = t.force_command.clone().filter(|fc| !fc.is_empty());
        if force_command.as_ref().is_some_and(|fc| fc.trim().is_empty() || fc.contains('\0')) {
            cx.err(&["targets", &name, "force_command"], "must be a command, not blanks", None);
        }
        if let Some(sa) = &t.source_address {
            for item in sa.split(',') {
                if Cidr::parse(item.trim()).is_err() {
                    cx.err(&["targets", &name, "source_address"], format!("{item:?} is not an IP or CIDR"), None);
                }
            }
        }
        let extensions = t.extensions.clone().unwrap_or_else(|| vec!["permit-pty".into()]);
        for e in &extensions {
            if !KNOWN_EXTENSIONS.contains(&e.as_str()) {
                cx.err(
                    &["targets", &name, "extensions"],
                    format!("unknown extension {e:?}"),
                    Some(format!("known: {}", KNOWN_EXTENSIONS.join(", "))),
                );
            }
        }
        if t.auto_approve == Some(false) {
            cx.err(
                &["targets", &name, "auto_approve"],
                "pending approvals are not supported: ephyr decides from the policy alone",
                Some("remove auto_approve".into()),
            );
        }
        if t.auto_revoke_on_deny == Some(true) {
            cx.err(
                &["targets", &name, "auto_revoke_on_deny"],
                "not supported: command filters are defence in depth, not a revocation trigger",
                Some("remove it; revoke tasks explicitly".into()),
            );
        }
        let verify_on_target = match t.verify_on_target {
            Some(true) => {
                let path = t.shim_path.clone().unwrap_or_else(|| "/usr/local/bin/ephyr".into());
                let ca = t.shim_ca.clone().unwrap_or_else(|| "/etc/ssh/ephyr_ca.pub".into());
                for (key, v) in [("shim_path", &path), ("shim_ca", &ca)] {
                    if !v.starts_with('/')
                        || !v.bytes().all(|b| b.is_ascii_graphic() && !b"'\"\\$`;&|<>*?".contains(&b))
                    {
                        cx.err(&["targets", &name, key], "an absolute path without spaces or shell characters", None);
                    }
                }
                if t.force_command.is_some() {
                    cx.err(
                        &["targets", &name, "verify_on_target"],
                        "a target that verifies commands runs `ephyr shim` as its forced command; remove force_command",
                        None,
                    );
                }
                Some(super::OnTarget { path, ca })
            }
            _ => {
                for (key, v) in [("shim_path", &t.shim_path), ("shim_ca", &t.shim_ca)] {
                    if v.is_some() {
                        cx.err(&["targets", &name, key], "only with verify_on_target: true", None);
                    }
                }
                None
            }
        };
        let files = t.files.as_ref().map(|f| {
            let mut patterns = |key: &str, list: &[String]| -> Vec<super::PathPattern> {
                list.iter()
                    .filter_map(|p| match super::PathPattern::parse(p) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            cx.err(&["targets", &name, "files", key], &e, None);
                            None
                        }
                    })
                    .collect()
            };
            let access = super::FileAccess { read: patterns("read", &f.read), write: patterns("write", &f.write) };
            if verify_on_target.is_some() || t.force_command.is_some() {
                cx.err(
                    &["targets", &name, "files"],
                    "the file tools use SFTP, which a forced command (force_command, verify_on_target) replaces on the target: remove files, or the forced command",
                    None,
                );
            }
            access
        });
        let commands = match crate::command::CommandPolicy::compile(
            t.commands.as_ref(),
            t.command_allow.as_deref().unwrap_or_default(),
            t.command_deny.as_deref().unwrap_or_default(),
        ) {
            Ok(c) => c,
            Err((key @ ("command_allow" | "command_deny"), msg)) => {
                cx.err(&["targets", &name, key], msg, None);
                None
            }
            Err((key, msg)) => {
                cx.err(&["targets", &name, "commands", key], msg, None);
                None
            }
        };
        targets.insert(
            name,
            Target {
                host: t.host,
                port,
                description: t.description.unwrap_or_default(),
                allowed_roles: allowed,
                host_key: pin,
                cert_ttl_default: def,
                cert_ttl_max: max,
                force_command,
                source_address: t.source_address,
                extensions,
                enabled: t.enabled.unwrap_or(true),
                commands,
                verify_on_target,
                files,
            },
        );
    }

    targets
}

/// Argument constraints (`args` of a grant, or one tool's in `tool_args`), validated.
fn arg_rules(
    cx: &mut Ctx<'_>,
    path: &[&str],
    files: &BTreeMap<String, ArgFile>,
) -> BTreeMap<String, crate::macaroon::envelope::ArgRule> {
    let mut args = BTreeMap::new();
    for (name, a) in files {
        let p: Vec<&str> = path.iter().copied().chain([name.as_str()]).collect();
        let mut rule = crate::macaroon::envelope::ArgRule::default();
        if !crate::macaroon::caveat::arg_name_ok(name) {
            cx.err(
                &p,
                format!("{name:?} is not an argument name"),
                Some(
                    "a name of [A-Za-z0-9_-], or a JSON pointer such as /options/path or /paths/* (every item)".into(),
                ),
            );
        }
        if let Some(pre) = &a.prefix {
            match NormPath::normalise(pre).filter(|n| n.as_str() == pre) {
                Some(n) => rule.prefixes.push(n),
                None => cx.err(&p, format!("prefix {pre:?} is not a normalised absolute path"), None),
            }
        }
        if let Some(m) = a.max {
            if m.is_finite() && m >= 0.0 {
                rule.at_most = Some(m);
            } else {
                cx.err(&p, "max must be a finite non-negative number", None);
            }
        }
        if let Some(m) = a.min {
            if m.is_finite() && m >= 0.0 && a.max.is_none_or(|x| m <= x) {
                rule.at_least = Some(m);
            } else {
                cx.err(&p, "min must be a finite non-negative number, at most max", None);
            }
        }
        if let Some(set) = &a.one_of {
            if set.is_empty() {
                cx.err(&p, "one_of must not be empty", None);
            }
            rule.one_of = Some(set.iter().cloned().collect());
        }
        if let Some(globs) = &a.glob {
            if globs.is_empty()
                || globs.iter().any(|g| g.is_empty() || g.len() > 128 || g.chars().any(char::is_control))
            {
                cx.err(&p, "glob must list 1-128 character patterns", None);
            }
            rule.like.push(globs.iter().cloned().collect());
        }
        if a.prefix.is_none() && a.max.is_none() && a.min.is_none() && a.one_of.is_none() && a.glob.is_none() {
            cx.err(&p, "an argument constraint needs prefix, max, min, one_of or glob", None);
        }
        args.insert(name.clone(), rule);
    }
    args
}

/// Static headers (`headers:` of a service or remote): valid names and values, and none that
/// carries a credential or that the broker manages (framing, hop-by-hop, Host).
fn static_headers(cx: &mut Ctx<'_>, path: &[&str], map: Option<&BTreeMap<String, String>>) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for (k, v) in map.into_iter().flatten() {
        let lk = k.to_ascii_lowercase();
        if !header_name_ok(k) || v.contains(['\r', '\n']) {
            cx.err(path, format!("invalid header {k:?}"), None);
        } else if [
            "authorization",
            "cookie",
            "proxy-authorization",
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
        ]
        .contains(&lk.as_str())
            || lk.starts_with("mcp-")
        {
            cx.err(
                path,
                format!("{k} cannot be a static header"),
                Some("credentials go in credential:; hop-by-hop, framing and MCP routing headers are managed by the broker".into()),
            );
        } else {
            headers.push((k.clone(), v.clone()));
        }
    }
    headers
}

/// Services: one section of the policy, validated.
fn services(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> BTreeMap<String, Service> {
    let mut services = BTreeMap::new();
    for (name, v) in section(cx, top, "services") {
        if !name_ok(&name) {
            cx.err(&["services", &name], "service names are 1-64 of [A-Za-z0-9_.-]", None);
        }
        let Some(s) = cx.entry::<ServiceFile>(&["services", &name], v) else { continue };
        let url = match parse_url(&s.url) {
            Ok(u) => u,
            Err(e) => {
                cx.err(&["services", &name, "url"], e, None);
                continue;
            }
        };
        let credential = s.credential.as_ref().and_then(|c| credential(cx, &["services", &name, "credential"], c));
        let mut allowed_hosts: BTreeSet<String> = [url.host.clone()].into();
        for h in s.allowed_hosts.iter().flatten() {
            let h = h.to_ascii_lowercase().trim_start_matches('[').trim_end_matches(']').to_owned();
            let bare = h.strip_prefix("*.").unwrap_or(&h);
            let host_ok = !bare.is_empty()
                && bare.len() <= 253
                && bare.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && !super::network::numeric_host_form(bare);
            if h == "*" && credential.is_some() {
                cx.err(
                    &["services", &name, "allowed_hosts"],
                    "\"*\" cannot be used with a credential: a secret is bound to the hosts it is for",
                    Some("list the hosts (or *.domain) the credential may be sent to".into()),
                );
            } else if h != "*" && !host_ok && h.parse::<std::net::IpAddr>().is_err() {
                cx.err(
                    &["services", &name, "allowed_hosts"],
                    format!("{h:?} is not a host name, an IP address, *.domain or *"),
                    None,
                );
            } else {
                allowed_hosts.insert(h);
            }
        }
        let m = s.methods.as_ref().map(|m| methods(cx, &["services", &name, "methods"], m));
        let paths = s.paths.as_ref().map(|p| path_patterns(cx, &["services", &name, "paths"], p));
        let headers = static_headers(cx, &["services", &name, "headers"], s.headers.as_ref());
        let tls = tls(cx, &["services", &name], s.tls.as_ref());
        let timeout = cx.duration(&["services", &name, "timeout"], s.timeout.as_deref(), Duration::from_secs(120));
        let connect_timeout =
            cx.duration(&["services", &name, "connect_timeout"], s.connect_timeout.as_deref(), Duration::from_secs(10));
        let read_timeout =
            cx.duration(&["services", &name, "read_timeout"], s.read_timeout.as_deref(), Duration::from_secs(30));
        for (key, d) in [("timeout", timeout), ("connect_timeout", connect_timeout), ("read_timeout", read_timeout)] {
            if d.is_zero() {
                cx.err(&["services", &name, key], "must be longer than 0s", None);
            }
        }
        let size = |cx: &mut Ctx<'_>, key: &str, v: &Option<String>, d: u64| -> u64 {
            match v.as_deref().map(parse_size) {
                None => d,
                Some(Some(n)) if n > 0 => n,
                _ => {
                    cx.err(&["services", &name, key], "a size looks like 512KiB, 10MiB or 1GiB", None);
                    d
                }
            }
        };
        let max_response = size(cx, "max_response", &s.max_response, 10 << 20);
        let max_request = size(cx, "max_request", &s.max_request, 1 << 20);
        let errors = match s.errors.as_deref() {
            None => ErrorStyle::for_host(&url.host),
            Some(v) => ErrorStyle::parse(v).unwrap_or_else(|| {
                cx.err(
                    &["services", &name, "errors"],
                    format!("{v:?} is not an error style"),
                    Some("openai (also OpenAI-compatible servers), anthropic or plain".into()),
                );
                ErrorStyle::Plain
            }),
        };
        let mint = s.mint.as_ref().and_then(|m| mint(cx, &name, m));
        services.insert(
            name,
            Service {
                url,
                description: s.description.unwrap_or_default(),
                credential,
                allowed_hosts,
                methods: m,
                paths,
                headers,
                tls,
                timeout,
                connect_timeout,
                read_timeout,
                max_response,
                max_request,
                errors,
                enabled: s.enabled.unwrap_or(true),
                mint,
            },
        );
    }

    services
}

/// `services.<name>.mint`, validated.
fn mint(cx: &mut Ctx<'_>, service: &str, m: &MintFile) -> Option<Mint> {
    let provider = match m.provider.as_str() {
        "openai" => MintProvider::OpenAi,
        other => {
            cx.err(
                &["services", service, "mint", "provider"],
                format!("{other:?} cannot mint keys"),
                Some("openai (project service accounts); other providers use the keyless proxy".into()),
            );
            return None;
        }
    };
    let admin_key = match parse_secret_ref(&m.admin_key) {
        Ok(s) => s,
        Err(e) => {
            cx.err(&["services", service, "mint", "admin_key"], e, None);
            return None;
        }
    };
    if !m.project.starts_with("proj_") || !name_ok(&m.project) {
        cx.err(&["services", service, "mint", "project"], "an OpenAI project id looks like proj_abc123", None);
        return None;
    }
    let url = match parse_url(m.url.as_deref().unwrap_or("https://api.openai.com/v1")) {
        Ok(u) => u,
        Err(e) => {
            cx.err(&["services", service, "mint", "url"], e, None);
            return None;
        }
    };
    let scopes = m.scopes.clone().unwrap_or_default();
    if let Some(s) = scopes.iter().find(|s| s.is_empty() || s.len() > 100 || !s.bytes().all(|b| b.is_ascii_graphic())) {
        cx.err(&["services", service, "mint", "scopes"], format!("{s:?} is not a scope"), None);
        return None;
    }
    Some(Mint { provider, admin_key, project: m.project.clone(), url, scopes })
}

/// Lease bounds of a run.
const LEASE_MIN: Duration = Duration::from_secs(3);
const LEASE_MAX: Duration = Duration::from_secs(600);

/// `runs:` validated against the services, targets and agents.
fn runs(
    cx: &mut Ctx<'_>,
    top: &serde_yaml_ng::Mapping,
    known: &Known<'_>,
    agents: &BTreeMap<String, Agent>,
) -> BTreeMap<String, RunTemplate> {
    let mut out = BTreeMap::new();
    for (name, v) in section(cx, top, "runs") {
        if !name_ok(&name) {
            cx.err(&["runs", &name], "run template names are 1-64 of [A-Za-z0-9_.-]", None);
        }
        let Some(f) = cx.entry::<RunFile>(&["runs", &name], v) else { continue };
        let mut ok = true;
        let role = match f.role {
            Some(r) if known.roles.contains_key(&r) => r,
            Some(r) => {
                cx.err(&["runs", &name, "role"], format!("no role {r:?}"), None);
                ok = false;
                r
            }
            None => {
                cx.err(&["runs", &name], "a run template names the SSH role its runs connect as (role:)", None);
                ok = false;
                String::new()
            }
        };
        let ttl = cx.duration(&["runs", &name, "ttl"], f.ttl.as_deref(), Duration::from_secs(30 * 60));
        if ttl > known.limits.task_ttl_max {
            cx.err(&["runs", &name, "ttl"], "longer than limits.task_ttl_max", None);
            ok = false;
        }
        let lease = cx.duration(&["runs", &name, "lease"], f.lease.as_deref(), Duration::from_secs(30));
        if !(LEASE_MIN..=LEASE_MAX).contains(&lease) {
            cx.err(&["runs", &name, "lease"], "a lease is 3s to 10m", None);
            ok = false;
        }
        let mut allowed = BTreeSet::new();
        for a in f.agents.unwrap_or_default() {
            if !agents.contains_key(&a) {
                cx.err(&["runs", &name, "agents"], format!("no agent {a:?}"), None);
                ok = false;
            }
            allowed.insert(a);
        }
        let envelope = match f.envelope {
            None => serde_json::Value::Object(Default::default()),
            Some(serde_json::Value::Object(m)) => {
                const FIELDS: [&str; 7] = ["targets", "roles", "services", "remotes", "methods", "tools", "args"];
                for (k, v) in &m {
                    let fine = FIELDS.contains(&k.as_str())
                        && (if k == "args" {
                            v.is_object()
                        } else {
                            v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|i| i.is_string()))
                        });
                    if !fine {
                        cx.err(
                            &["runs", &name, "envelope", k],
                            format!("{k:?} is not an envelope field with a non-empty list of names"),
                            Some(format!("fields are {}", FIELDS.join(", "))),
                        );
                        ok = false;
                    }
                }
                serde_json::Value::Object(m)
            }
            Some(_) => {
                cx.err(
                    &["runs", &name, "envelope"],
                    "an envelope is a mapping (targets: [...], services: [...])",
                    None,
                );
                ok = false;
                serde_json::Value::Null
            }
        };
        let mut keys = Vec::new();
        for k in f.keys.unwrap_or_default() {
            match known.services.get(&k) {
                Some(s) if s.mint.is_some() => keys.push(k),
                Some(_) => {
                    cx.err(
                        &["runs", &name, "keys"],
                        format!("service {k:?} has no mint: section (disposable keys)"),
                        None,
                    );
                    ok = false;
                }
                None => {
                    cx.err(&["runs", &name, "keys"], format!("no service {k:?}"), None);
                    ok = false;
                }
            }
        }
        let budget = f.budget.unwrap_or_default();
        if budget.requests == Some(0) || budget.tokens == Some(0) {
            cx.err(&["runs", &name, "budget"], "a budget of 0 allows nothing; leave the field out for no limit", None);
            ok = false;
        }
        let broker_url = match f.broker_url {
            None => None,
            Some(u) => match parse_url(&u) {
                Ok(p) if p.base_path.is_empty() => Some(u.trim_end_matches('/').to_owned()),
                Ok(_) => {
                    cx.err(
                        &["runs", &name, "broker_url"],
                        "the broker's base URL has no path (http://broker:8554)",
                        None,
                    );
                    ok = false;
                    None
                }
                Err(e) => {
                    cx.err(&["runs", &name, "broker_url"], e, None);
                    ok = false;
                    None
                }
            },
        };
        if ok {
            out.insert(
                name.clone(),
                RunTemplate {
                    name,
                    description: f.description.unwrap_or_default(),
                    agents: allowed,
                    role,
                    ttl,
                    lease,
                    envelope,
                    budget: Budget { requests: budget.requests, tokens: budget.tokens },
                    keys,
                    broker_url,
                },
            );
        }
    }
    out
}

/// Remotes: one section of the policy, validated.
fn remotes(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> BTreeMap<String, Remote> {
    let mut remotes = BTreeMap::new();
    for (name, v) in section(cx, top, "remotes") {
        if !name_ok(&name) || name.contains('.') {
            cx.err(
                &["remotes", &name],
                "remote names are 1-64 of [A-Za-z0-9_-] (no dots: they prefix tool names)",
                None,
            );
        }
        let Some(r) = cx.entry::<RemoteFile>(&["remotes", &name], v) else { continue };
        let transport = match (&r.url, &r.command) {
            (Some(url), None) => {
                let stdio_only = [
                    ("env", r.env.is_some()),
                    ("secret_env", r.secret_env.is_some()),
                    ("cwd", r.cwd.is_some()),
                    ("sandbox", r.sandbox.is_some()),
                ];
                for (key, set) in stdio_only {
                    if set {
                        cx.err(
                            &["remotes", &name, key],
                            format!("{key} applies to a command (stdio) remote, not to a url"),
                            None,
                        );
                    }
                }
                match parse_url(url) {
                    Ok(u) => Transport::Http(u),
                    Err(e) => {
                        cx.err(&["remotes", &name, "url"], e, None);
                        continue;
                    }
                }
            }
            (None, Some(argv)) => {
                for (key, set) in [("credential", r.credential.is_some()), ("tls", r.tls.is_some())] {
                    if set {
                        cx.err(
                            &["remotes", &name, key],
                            format!("{key} applies to a url (HTTP) remote"),
                            Some("give a command its secrets through secret_env".into()),
                        );
                    }
                }
                match stdio_command(cx, &name, argv, &r) {
                    Some(c) => Transport::Stdio(Box::new(c)),
                    None => continue,
                }
            }
            (Some(_), Some(_)) => {
                cx.err(&["remotes", &name], "give either url (HTTP) or command (stdio), not both", None);
                continue;
            }
            (None, None) => {
                cx.err(
                    &["remotes", &name],
                    "a remote needs a url (Streamable HTTP) or a command (stdio)",
                    Some("url: http://host:port/mcp, or command: [node, /path/to/server.js]".into()),
                );
                continue;
            }
        };
        let credential = r.credential.as_ref().and_then(|c| credential(cx, &["remotes", &name, "credential"], c));
        let tls = tls(cx, &["remotes", &name], r.tls.as_ref());
        let headers = static_headers(cx, &["remotes", &name, "headers"], r.headers.as_ref());
        if !headers.is_empty() && matches!(transport, Transport::Stdio(_)) {
            cx.err(&["remotes", &name, "headers"], "headers apply to a url (HTTP) remote", None);
        }
        let max_response = match r.max_response.as_deref().map(parse_size) {
            None => 4 << 20,
            Some(Some(n)) if (1024..=64 << 20).contains(&n) => n as usize,
            _ => {
                cx.err(&["remotes", &name, "max_response"], "a size between 1KiB and 64MiB, e.g. 4MiB", None);
                4 << 20
            }
        };
        let timeout = cx.duration(&["remotes", &name, "timeout"], r.timeout.as_deref(), Duration::from_secs(30));
        let oauth = r.oauth.as_ref().and_then(|o| remote_oauth(cx, top, &name, o, &r, &transport));
        let pin = match r.pin.as_deref() {
            None | Some("strict") => PinMode::Strict,
            Some("warn") => PinMode::Warn,
            Some("off") => PinMode::Off,
            Some(other) => {
                cx.err(
                    &["remotes", &name, "pin"],
                    format!("{other:?} is not a pin mode"),
                    Some("strict, warn or off".into()),
                );
                PinMode::Strict
            }
        };
        let prefix = r.tool_prefix.clone().unwrap_or_else(|| name.clone());
        if !name_ok(&prefix) || prefix.contains('.') {
            cx.err(&["remotes", &name, "tool_prefix"], "1-64 of [A-Za-z0-9_-]", None);
        }
        // Two remotes under one prefix would make `<prefix>.<tool>` ambiguous.
        if let Some((other, _)) = remotes.iter().find(|(_, r): &(&String, &Remote)| r.tool_prefix == prefix) {
            cx.err(
                &["remotes", &name, "tool_prefix"],
                format!("tool prefix {prefix:?} is already remote {other:?}'s: their tools would collide"),
                Some("give one of them another tool_prefix".into()),
            );
        }
        remotes.insert(
            name,
            Remote {
                transport,
                description: r.description.unwrap_or_default(),
                credential,
                tools: r.tools.map(|t| t.into_iter().collect()),
                tool_prefix: prefix,
                tls,
                timeout,
                enabled: r.enabled.unwrap_or(true),
                pin,
                headers,
                max_response,
                oauth,
            },
        );
    }

    remotes
}

/// Whether `s` is an OAuth scope token (RFC 6749 §3.3).
fn scope_token_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// `remotes.<name>.oauth`.
fn remote_oauth(
    cx: &mut Ctx<'_>,
    top: &serde_yaml_ng::Mapping,
    name: &str,
    o: &RemoteOAuthFile,
    r: &RemoteFile,
    transport: &Transport,
) -> Option<RemoteOAuth> {
    let at = |key: &'static str| -> Vec<&str> { vec!["remotes", name, "oauth", key] };
    if matches!(transport, Transport::Stdio(_)) {
        cx.err(&["remotes", name, "oauth"], "oauth applies to a url (HTTP) remote", None);
        return None;
    }
    if r.credential.is_some() {
        cx.err(
            &["remotes", name, "oauth"],
            "give either credential (a fixed secret) or oauth (a sign-in), not both",
            None,
        );
        return None;
    }
    let client_secret = match &o.client_secret {
        None => None,
        Some(_) if o.client_id.is_none() => {
            cx.err(&at("client_secret"), "a client_secret belongs to a pre-registered client_id", None);
            None
        }
        Some(t) => match parse_secret_ref(t) {
            Ok(s) => Some(s),
            Err(e) => {
                cx.err(&at("client_secret"), e, Some("store it with `ephyr secret set NAME`, write store:NAME".into()));
                None
            }
        },
    };
    if let Some(id) = &o.client_id
        && (id.is_empty() || id.len() > 512 || id.chars().any(char::is_control))
    {
        cx.err(&at("client_id"), "1-512 printable characters", None);
    }
    if let Some(u) = &o.client_id_url
        && !(u.starts_with("https://")
            && u.len() <= 2000
            && !u.contains(['#', ' '])
            && u.parse::<http::Uri>().is_ok_and(|p| p.host().is_some() && p.path().len() > 1))
    {
        cx.err(
            &at("client_id_url"),
            format!("{u:?} is not an https URL with a path"),
            Some("the address where the broker's client ID metadata document is published".into()),
        );
    }
    let redirect_uri = match &o.redirect_uri {
        Some(u) => {
            if let Err(e) = crate::broker::oauth::redirect_uri_ok(u) {
                cx.err(&at("redirect_uri"), e, Some("https, or http on a loopback address".into()));
            }
            u.clone()
        }
        // The broker's own callback when its public address is known (`oauth.issuer`).
        None => match top.get("oauth").and_then(|v| v.get("issuer")).and_then(serde_yaml_ng::Value::as_str) {
            Some(i) => format!("{}{}", i.trim_end_matches('/'), crate::broker::federation::auth::CALLBACK_PATH),
            None => super::LOOPBACK_REDIRECT.to_owned(),
        },
    };
    if let Some(list) = &o.scopes
        && let Some(bad) = list.iter().find(|s| !scope_token_ok(s))
    {
        cx.err(&at("scopes"), format!("{bad:?} is not a scope (printable, no spaces or quotes)"), None);
    }
    Some(RemoteOAuth {
        client_id: o.client_id.clone(),
        client_secret,
        client_id_url: o.client_id_url.clone(),
        redirect_uri,
        scopes: o.scopes.clone(),
        per_agent: o.per_agent.unwrap_or(false),
    })
}

fn absolute_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(format!("{p:?}: use an absolute path"));
    }
    if p.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("{p:?}: write the path without . or .. segments"));
    }
    Ok(())
}

fn env_name_ok(n: &str) -> bool {
    let mut b = n.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// A stdio remote's command and confinement.
fn stdio_command(cx: &mut Ctx<'_>, name: &str, argv: &[String], r: &RemoteFile) -> Option<StdioCommand> {
    let base = ["remotes", name];
    let at = |k: &'static str| [base[0], base[1], k];
    if argv.is_empty() || argv[0].is_empty() {
        cx.err(&at("command"), "the command needs a program", Some("command: [node, /path/to/server.js]".into()));
        return None;
    }
    if argv.iter().any(|a| a.contains('\0')) {
        cx.err(&at("command"), "an argument contains a NUL byte", None);
        return None;
    }
    let env = r.env.clone().unwrap_or_default();
    let mut secret_env = BTreeMap::new();
    for (k, v) in env.iter().map(|(k, v)| (k, Some(v))).chain(r.secret_env.iter().flatten().map(|(k, _)| (k, None))) {
        if !env_name_ok(k) {
            cx.err(&at(if v.is_some() { "env" } else { "secret_env" }), format!("{k:?} is not a variable name"), None);
        }
        if v.is_some_and(|v| v.contains('\0')) {
            cx.err(&at("env"), format!("{k}: the value contains a NUL byte"), None);
        }
    }
    for (k, v) in r.secret_env.iter().flatten() {
        if env.contains_key(k) {
            cx.err(&at("secret_env"), format!("{k} is set in env too"), None);
        }
        match parse_secret_ref(v) {
            Ok(s) => {
                secret_env.insert(k.clone(), s);
            }
            Err(e) => cx.err(&at("secret_env"), format!("{k}: {e}"), None),
        }
    }
    if let Some(c) = &r.cwd
        && let Err(e) = absolute_path(c)
    {
        cx.err(&at("cwd"), e, None);
    }
    let sb = r.sandbox.as_ref();
    let mut paths = |key: &'static str, list: Option<&Vec<String>>| -> Vec<String> {
        let mut out = Vec::new();
        for p in list.into_iter().flatten() {
            match absolute_path(p) {
                Ok(()) if p == "/" => out.push("/".to_owned()),
                Ok(()) => out.push(p.trim_end_matches('/').to_owned()),
                Err(e) => cx.err(&["remotes", name, "sandbox", key], e, None),
            }
        }
        out
    };
    let read = paths("read", sb.map(|s| &s.read));
    let write = paths("write", sb.map(|s| &s.write));
    // Checked against this machine (the policy may be written elsewhere): warnings, not errors.
    if argv[0].starts_with('/') && !std::path::Path::new(&argv[0]).exists() {
        cx.warn(&at("command"), format!("{:?} does not exist on this machine", argv[0]));
    }
    for (key, list) in [("read", &read), ("write", &write)] {
        for p in list.iter().filter(|p| !std::path::Path::new(p.as_str()).exists()) {
            cx.warn(
                &["remotes", name, "sandbox", key],
                format!("{p:?} does not exist on this machine: the remote is not started until it does"),
            );
        }
    }
    let memory = match sb.and_then(|s| s.memory.as_deref()) {
        None => 1 << 30,
        Some(m) => match parse_size(m) {
            Some(n) if n >= 16 << 20 => n,
            _ => {
                cx.err(
                    &["remotes", name, "sandbox", "memory"],
                    format!("{m:?}: write a size of at least 16MiB, e.g. 512MiB"),
                    None,
                );
                1 << 30
            }
        },
    };
    let mut count = |key: &'static str, v: Option<u64>, default: u64| match v {
        None => default,
        Some(n) if (16..=1 << 20).contains(&n) => n,
        Some(n) => {
            cx.err(&["remotes", name, "sandbox", key], format!("{n} is out of range (16 to 1048576)"), None);
            default
        }
    };
    let open_files = count("open_files", sb.and_then(|s| s.open_files), 256);
    let processes = count("processes", sb.and_then(|s| s.processes), 256);
    Some(StdioCommand {
        argv: argv.to_vec(),
        env,
        secret_env,
        cwd: r.cwd.clone(),
        read,
        write,
        network: sb.and_then(|s| s.network).unwrap_or(false),
        memory,
        open_files,
        processes,
    })
}

/// Network: one section of the policy, validated.
fn network(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> NetworkPolicy {
    let nf: NetworkFile = top.get("network").and_then(|v| cx.entry(&["network"], v)).unwrap_or_default();
    let mut network = NetworkPolicy::default();
    for (key, list, out) in [("allow", &nf.allow, &mut network.allow), ("deny", &nf.deny, &mut network.deny)] {
        for c in list {
            match Cidr::parse(c) {
                Ok(c) => out.push(c),
                Err(e) => cx.err(&["network", key], e, None),
            }
        }
    }

    network
}

/// The MCP endpoint: one section of the policy, validated.
fn mcp(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> McpSettings {
    let mf: McpFile = top.get("mcp").and_then(|v| cx.entry(&["mcp"], v)).unwrap_or_default();
    let mut mcp = McpSettings::default();
    for o in &mf.allowed_origins {
        match normalize_origin(o) {
            Some(n) => mcp.allowed_origins.push(n),
            None => cx.err(
                &["mcp", "allowed_origins"],
                format!("{o:?} is not an origin"),
                Some("an origin is scheme://host[:port] with no path, e.g. https://pi.local:8554".into()),
            ),
        }
    }
    for h in &mf.allowed_hosts {
        if h.is_empty() || h.contains(['/', ' ', '@']) {
            cx.err(&["mcp", "allowed_hosts"], format!("{h:?} is not a host name"), None);
        } else {
            mcp.allowed_hosts.push(h.to_ascii_lowercase());
        }
    }
    if let Some(v) = &mf.max_request_size {
        match parse_size(v) {
            Some(n) if (1024..=(64 << 20)).contains(&n) => mcp.max_request_size = n as usize,
            _ => cx.err(&["mcp", "max_request_size"], "a size between 1KiB and 64MiB, e.g. 1MiB", None),
        }
    }
    mcp.auth_cache_ttl = cx.duration(&["mcp", "auth_cache_ttl"], mf.auth_cache_ttl.as_deref(), mcp.auth_cache_ttl);
    mcp.session_idle_timeout =
        cx.duration(&["mcp", "session_idle_timeout"], mf.session_idle_timeout.as_deref(), mcp.session_idle_timeout);
    if mcp.session_idle_timeout.is_zero() {
        cx.err(&["mcp", "session_idle_timeout"], "must be longer than 0s", None);
    }
    if let Some(n) = mf.max_sessions {
        mcp.max_sessions = n;
    }
    if let Some(n) = mf.max_streams {
        mcp.max_streams = n;
    }

    mcp
}

/// What the agents section is checked against: the sections validated before it.
struct Known<'a> {
    limits: &'a Limits,
    roles: &'a BTreeMap<String, Role>,
    targets: &'a BTreeMap<String, Target>,
    services: &'a BTreeMap<String, Service>,
    remotes: &'a BTreeMap<String, Remote>,
}

/// Templates and agents: each agent's own grants merged with the templates it inherits, checked
/// against the sections before; also returns the agents by uid.
fn agents(
    cx: &mut Ctx<'_>,
    top: &serde_yaml_ng::Mapping,
    known: &Known<'_>,
) -> (BTreeMap<String, Agent>, BTreeMap<u32, String>, BTreeMap<String, Agent>) {
    let Known { limits, roles, targets, services, remotes } = *known;
    // Templates (validated as they are merged into agents; parsed once here).
    let mut templates: BTreeMap<String, TemplateFile> = BTreeMap::new();
    for (name, v) in section(cx, top, "templates") {
        if let Some(t) = cx.entry::<TemplateFile>(&["templates", &name], v) {
            templates.insert(name, t);
        }
    }

    // Agents.
    let mut agents = BTreeMap::new();
    let mut by_uid = BTreeMap::new();
    for (name, v) in section(cx, top, "agents") {
        if !name_ok(&name) {
            cx.err(&["agents", &name], "agent names are 1-64 of [A-Za-z0-9_.-]", None);
        }
        let Some(a) = cx.entry::<AgentFile>(&["agents", &name], v) else { continue };
        if let Some(h) = &a.api_key_hash {
            api_key_hash(cx, &name, h);
        }
        if let Some(uid) = a.uid
            && let Some(other) = by_uid.insert(uid, name.clone())
        {
            cx.err(&["agents", &name, "uid"], format!("uid {uid} is already agent {other:?}"), None);
        }
        let max_task_ttl =
            cx.duration(&["agents", &name, "max_task_ttl"], a.max_task_ttl.as_deref(), limits.task_ttl_max);
        if max_task_ttl > limits.task_ttl_max {
            cx.err(
                &["agents", &name, "max_task_ttl"],
                format!(
                    "is {}, above limits.task_ttl_max ({})",
                    crate::time::format_duration(max_task_ttl),
                    crate::time::format_duration(limits.task_ttl_max)
                ),
                None,
            );
        }
        let depth = a.max_delegation_depth.unwrap_or(limits.delegation_depth_max);
        if depth > limits.delegation_depth_max {
            cx.err(&["agents", &name, "max_delegation_depth"], "exceeds limits.delegation_depth_max", None);
        }
        let rate = cx.rate(&["agents", &name, "rate_limit"], a.rate_limit.as_deref(), limits.requests_per_agent);
        let mut agent = Agent {
            name: name.clone(),
            description: a.description.clone().unwrap_or_default(),
            api_key_hash: a.api_key_hash.clone(),
            uid: a.uid,
            ssh: Grants::default(),
            services: Grants::default(),
            remotes: Grants::default(),
            dashboard: DashboardLevel::None,
            can_delegate: a.can_delegate.unwrap_or(false),
            max_delegation_depth: depth,
            max_task_ttl,
            require_pop: a.require_pop.unwrap_or(false),
            max_concurrent_certs: a.max_concurrent_certs.unwrap_or(limits.max_certs_per_agent),
            rate_limit: rate,
            enabled: a.enabled.unwrap_or(true),
            state: crate::broker::agents::AgentState::Active,
            owner: None,
            template: None,
        };
        let mut dash = false;
        let own = Grantable {
            ssh: a.ssh.as_ref(),
            services: a.services.as_ref(),
            remotes: a.remotes.as_ref(),
            dashboard: a.dashboard.as_deref(),
        };
        merge_grants(cx, &["agents", &name], &own, roles, targets, services, remotes, &mut agent, &mut dash);
        for t in &a.inherits {
            match templates.get(t) {
                None => cx.err(
                    &["agents", &name, "inherits"],
                    format!("unknown template {t:?}"),
                    Some(format!("templates defined: {}", join_keys(&templates))),
                ),
                Some(tf) => {
                    let g = Grantable {
                        ssh: tf.ssh.as_ref(),
                        services: tf.services.as_ref(),
                        remotes: tf.remotes.as_ref(),
                        dashboard: tf.dashboard.as_deref(),
                    };
                    merge_grants(cx, &["templates", t], &g, roles, targets, services, remotes, &mut agent, &mut dash);
                }
            }
        }
        if agent.ssh.entries().is_empty()
            && agent.services.entries().is_empty()
            && agent.remotes.entries().is_empty()
            && agent.dashboard == DashboardLevel::None
        {
            cx.warn(&["agents", &name], "has no grants and can do nothing but create tasks over nothing (Go Ephyr gave such 'legacy' agents full access; ephyr gives nothing)");
        }
        if agent.api_key_hash.is_none() && agent.uid.is_none() {
            cx.warn(&["agents", &name], "has neither api_key_hash nor uid, so it cannot authenticate");
        }
        agents.insert(name, agent);
    }
    let argon2 =
        agents.values().filter(|a| a.api_key_hash.as_deref().is_some_and(|h| h.starts_with("$argon2"))).count();
    if argon2 > super::key_hash::MAX_FOREIGN_CANDIDATES {
        cx.warn(
            &["agents"],
            format!(
                "{argon2} agents have Argon2id hashes: keys not in ephyr's format (ephyr_ak_…) are refused, since each would cost {argon2} Argon2 runs; at most {} are tried (replace the hashes of ephyr keys with their ephyr-sha256 form)",
                super::key_hash::MAX_FOREIGN_CANDIDATES
            ),
        );
    }

    // Each template alone, with the defaults: what an enrolled agent of it is granted. Checked
    // on a scratch context so a template's problem is reported once, not once more here.
    let mut scratch = Ctx { text: cx.text, origin: cx.origin, problems: Vec::new(), warnings: Vec::new() };
    let mut prototypes = BTreeMap::new();
    for (name, tf) in &templates {
        let mut agent = Agent {
            name: name.clone(),
            description: tf.description.clone().unwrap_or_default(),
            api_key_hash: None,
            uid: None,
            ssh: Grants::default(),
            services: Grants::default(),
            remotes: Grants::default(),
            dashboard: DashboardLevel::None,
            can_delegate: tf.can_delegate.unwrap_or(false),
            max_delegation_depth: limits.delegation_depth_max,
            max_task_ttl: limits.task_ttl_max,
            require_pop: false,
            max_concurrent_certs: limits.max_certs_per_agent,
            rate_limit: limits.requests_per_agent,
            enabled: true,
            state: crate::broker::agents::AgentState::Active,
            owner: None,
            template: Some(name.clone()),
        };
        let g = Grantable {
            ssh: tf.ssh.as_ref(),
            services: tf.services.as_ref(),
            remotes: tf.remotes.as_ref(),
            dashboard: tf.dashboard.as_deref(),
        };
        let mut dash = false;
        merge_grants(&mut scratch, &["templates", name], &g, roles, targets, services, remotes, &mut agent, &mut dash);
        prototypes.insert(name.clone(), agent);
    }
    for p in scratch.problems {
        if !cx.problems.contains(&p) {
            cx.problems.push(p);
        }
    }
    for (name, tf) in &templates {
        if let Some(a) = &tf.attest
            && a.kubernetes.is_none()
        {
            cx.err(
                &["templates", name, "attest"],
                "names no attestation",
                Some("kubernetes: {jwks_file, issuer, audience, ...}".into()),
            );
        }
    }

    (agents, by_uid, prototypes)
}

/// `templates.*.attest` (after the templates parsed): the JWK sets read now.
fn attestations(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> BTreeMap<String, Attestation> {
    let mut out = BTreeMap::new();
    let Some(Value::Mapping(m)) = top.get("templates") else { return out };
    for (k, v) in m {
        let (Some(name), Some(a)) = (k.as_str(), v.get("attest")) else { continue };
        let Ok(f) = serde_yaml_ng::from_value::<AttestFile>(a.clone()) else { continue };
        let Some(k8s) = f.kubernetes else { continue };
        let at = ["templates", name, "attest", "kubernetes", "jwks_file"];
        let keys = match std::fs::read_to_string(&k8s.jwks_file) {
            Ok(text) => match crate::broker::jose::key_set(&text) {
                Ok(k) => k,
                Err(e) => {
                    cx.err(&at, format!("{}: {e}", k8s.jwks_file), None);
                    continue;
                }
            },
            Err(e) => {
                cx.err(&at, format!("{}: {e}", k8s.jwks_file), Some("kubectl get --raw /openid/v1/jwks > FILE".into()));
                continue;
            }
        };
        if k8s.issuer.is_empty() || k8s.audience.is_empty() {
            cx.err(&["templates", name, "attest", "kubernetes"], "issuer and audience are required", None);
            continue;
        }
        let every =
            f.every.as_deref().map(|e| cx.duration(&["templates", name, "attest", "every"], Some(e), Duration::ZERO));
        if every.is_some_and(|e| e < Duration::from_secs(60)) {
            cx.err(&["templates", name, "attest", "every"], "must be at least 1m", None);
        }
        out.insert(
            name.to_owned(),
            Attestation {
                keys,
                issuer: k8s.issuer,
                audience: k8s.audience,
                namespaces: k8s.namespaces,
                service_accounts: k8s.service_accounts,
                every,
            },
        );
    }
    out
}

/// `oauth:` — the built-in authorization server (docs/oauth.md).
fn oauth(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping, limits: &Limits) -> Option<OAuthSettings> {
    let v = top.get("oauth")?;
    let f = if v.is_null() { OAuthFile::default() } else { cx.entry::<OAuthFile>(&["oauth"], v)? };
    let url = |cx: &mut Ctx<'_>, key: &str, v: Option<String>| -> Option<String> {
        let v = v?;
        let ok = (v.starts_with("https://") || v.starts_with("http://"))
            && !v.contains(['?', '#', ' '])
            && v.parse::<http::Uri>().is_ok_and(|u| u.host().is_some() && matches!(u.path(), "" | "/"));
        if !ok {
            cx.err(
                &["oauth", key],
                format!("{v:?} is not a base URL"),
                Some("write scheme://host[:port], no path".into()),
            );
            return None;
        }
        Some(v.trim_end_matches('/').to_owned())
    };
    let issuer = url(cx, "issuer", f.issuer);
    let console_url = url(cx, "console_url", f.console_url);
    let access_ttl = cx.duration(&["oauth", "access_ttl"], f.access_ttl.as_deref(), Duration::from_secs(3600));
    if access_ttl.is_zero() || access_ttl > limits.task_ttl_max {
        cx.err(&["oauth", "access_ttl"], "must be longer than 0s and at most limits.task_ttl_max", None);
    }
    let refresh_ttl =
        cx.duration(&["oauth", "refresh_ttl"], f.refresh_ttl.as_deref(), Duration::from_secs(30 * 86_400));
    if refresh_ttl < access_ttl {
        cx.err(&["oauth", "refresh_ttl"], "must be at least oauth.access_ttl", None);
    }
    for d in &f.client_id_domains {
        let name = d.strip_prefix("*.").unwrap_or(d);
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            || name.starts_with('.')
        {
            cx.err(&["oauth", "client_id_domains"], format!("{d:?} is not a host name (or *.domain)"), None);
        }
    }
    if let Some(f) = &f.client_id_ca_file
        && !std::path::Path::new(f).is_file()
    {
        cx.err(&["oauth", "client_id_ca_file"], format!("{f}: no such file"), None);
    }
    Some(OAuthSettings {
        issuer,
        console_url,
        access_ttl,
        refresh_ttl,
        registration: f.registration.unwrap_or(true),
        client_id_domains: f.client_id_domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        client_id_ca_file: f.client_id_ca_file.clone(),
    })
}

/// `lifecycle:` — join token lifetimes and the reaper's clock (docs/agents.md).
fn lifecycle(cx: &mut Ctx<'_>, top: &serde_yaml_ng::Mapping) -> Lifecycle {
    let d = Lifecycle::default();
    let Some(v) = top.get("lifecycle") else { return d };
    let Some(f) = cx.entry::<LifecycleFile>(&["lifecycle"], v) else { return d };
    let dur = |cx: &mut Ctx<'_>, key: &str, v: Option<&str>, def: std::time::Duration| {
        let got = cx.duration(&["lifecycle", key], v, def);
        if got.is_zero() {
            cx.err(&["lifecycle", key], "must be longer than 0s", None);
            return def;
        }
        got
    };
    let join_ttl_max = dur(cx, "join_ttl_max", f.join_ttl_max.as_deref(), d.join_ttl_max);
    let join_ttl = dur(cx, "join_ttl", f.join_ttl.as_deref(), d.join_ttl.min(join_ttl_max));
    if join_ttl > join_ttl_max {
        cx.err(&["lifecycle", "join_ttl"], "is longer than lifecycle.join_ttl_max", None);
    }
    let reaper_apply = match f.reaper.as_deref() {
        None | Some("report") => false,
        Some("apply") => true,
        Some(other) => {
            cx.err(&["lifecycle", "reaper"], format!("unknown mode {other:?}"), Some("report or apply".into()));
            false
        }
    };
    Lifecycle {
        join_ttl,
        join_ttl_max,
        idle_after: dur(cx, "idle_after", f.idle_after.as_deref(), d.idle_after),
        decommission_after: dur(cx, "decommission_after", f.decommission_after.as_deref(), d.decommission_after),
        drift_after: dur(cx, "drift_after", f.drift_after.as_deref(), d.drift_after),
        reaper_apply,
    }
}

/// Parses and validates a policy: each section by its own function, then the agents, which use
/// all of them.
/// A duplicate-key error: the problem at the duplicate (the second occurrence, at the indent of
/// the first) and the text with the duplicate entry blanked out (its lines kept, emptied).
fn duplicate_key(e: &serde_yaml_ng::Error, text: &str, origin: &str) -> Option<(Problem, String)> {
    let msg = e.to_string();
    let key = msg.split("duplicate entry with key \"").nth(1)?.split('"').next()?.to_owned();
    let first = e.location()?;
    let lines: Vec<&str> = text.lines().collect();
    let indent = first.column().saturating_sub(1);
    let starts = |l: &str| {
        let rest = l.get(indent..).unwrap_or("");
        l.len() - l.trim_start().len() == indent
            && [format!("{key}:"), format!("\"{key}\":"), format!("'{key}':")]
                .iter()
                .any(|k| rest.starts_with(k.as_str()))
    };
    let dup = (first.line()..lines.len()).find(|&i| starts(lines[i]))?;
    let end = (dup + 1..lines.len())
        .find(|&i| {
            let l = lines[i];
            !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.len() - l.trim_start().len() <= indent
        })
        .unwrap_or(lines.len());
    let mut out: Vec<&str> = lines.clone();
    for l in out.iter_mut().take(end).skip(dup) {
        *l = "";
    }
    let problem = Problem {
        at: format!("{origin}:{}:{}", dup + 1, indent + 1),
        path: String::new(),
        message: format!("duplicate key {key:?} (first at line {}); YAML would keep only one of them", first.line()),
        hint: Some("remove or rename one of them".into()),
    };
    Some((problem, out.join("\n")))
}

/// The hash of the API key in the shipped examples and docs: its key is not secret.
const EXAMPLE_KEY_HASHES: [&str; 1] =
    ["$argon2id$v=19$m=19456,t=2,p=1$EGLPWvUDnoDhQUvjerb0Eg$eUzfssKNVqQzWz1wt4i3OthKxUWw4qY+QzwylwLkqnE"];

/// What loads but would fail, or be unsafe, at request time.
fn request_time_warnings(
    cx: &mut Ctx<'_>,
    services: &BTreeMap<String, Service>,
    network: &NetworkPolicy,
    agents: &BTreeMap<String, Agent>,
) {
    for (name, s) in services {
        let host = s.url.host.trim_start_matches('[').trim_end_matches(']');
        let ip = if host.eq_ignore_ascii_case("localhost") { "127.0.0.1".parse().ok() } else { host.parse().ok() };
        if let Some(ip) = ip
            && let Err(why) = network.check(ip)
        {
            cx.warn(
                &["services", name, "url"],
                format!(
                    "every request to it will be refused: {why} (add network: {{ allow: [{ip}/32] }} if you mean it)"
                ),
            );
        }
    }
    for (name, a) in agents {
        if a.api_key_hash.as_deref().is_some_and(|h| EXAMPLE_KEY_HASHES.contains(&h)) {
            cx.warn(
                &["agents", name, "api_key_hash"],
                format!("is the example's hash, whose key is in the docs: run `ephyr keygen agent {name}` and paste its line"),
            );
        }
    }
}

pub fn build(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    // A duplicate key is reported where the duplicate is, then left out, and the rest of the
    // file is checked all the same; line numbers stay those of the file.
    let mut problems = Vec::new();
    let mut cleaned = text.to_owned();
    let doc: Value = loop {
        match serde_yaml_ng::from_str(&cleaned) {
            Ok(v) => break v,
            Err(e) => {
                if problems.len() < 32
                    && let Some((p, without)) = duplicate_key(&e, &cleaned, origin)
                {
                    problems.push(p);
                    cleaned = without;
                    continue;
                }
                let at = e.location().map(|l| format!("{origin}:{}:{}", l.line(), l.column())).unwrap_or(origin.into());
                problems.push(Problem {
                    at,
                    path: String::new(),
                    message: e.to_string(),
                    hint: Some("this is YAML syntax; check indentation and quoting".into()),
                });
                return Err(PolicyError { problems, warnings: Vec::new() });
            }
        }
    };
    let text = cleaned.as_str();
    let mut cx = Ctx { text, origin, problems, warnings: vec![] };
    let empty = serde_yaml_ng::Mapping::new();
    let top = match &doc {
        Value::Mapping(m) => m,
        Value::Null => &empty,
        _ => {
            cx.err(&[], "the policy must be a YAML mapping (sections such as agents:, targets:)", None);
            &empty
        }
    };
    for k in top.keys() {
        match k.as_str() {
            Some(s) if SECTIONS.contains(&s) => {}
            Some(s) => {
                cx.err(&[s], format!("unknown section {s:?}"), Some(format!("sections are {}", SECTIONS.join(", "))))
            }
            None => cx.err(&[], format!("section names must be strings, found {k:?}"), None),
        }
    }
    match top.get("version") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(v) => cx.err(
            &["version"],
            format!("unsupported policy version {v:?}"),
            Some("this broker reads version 1".into()),
        ),
    }

    let limits = limits(&mut cx, top);
    let roles = roles(&mut cx, top);
    let targets = targets(&mut cx, top, &limits, &roles);
    let services = services(&mut cx, top);
    let remotes = remotes(&mut cx, top);
    let network = network(&mut cx, top);
    let mcp = mcp(&mut cx, top);
    let known = Known { limits: &limits, roles: &roles, targets: &targets, services: &services, remotes: &remotes };
    let (agents, by_uid, templates) = agents(&mut cx, top, &known);
    let lifecycle = lifecycle(&mut cx, top);
    let oauth = oauth(&mut cx, top, &limits);
    let attest = attestations(&mut cx, top);
    let operators = operators(&mut cx, top);
    let approvals = approvals(&mut cx, top, &known, &operators);
    let runs = runs(&mut cx, top, &known, &agents);

    request_time_warnings(&mut cx, &services, &network, &agents);
    if !cx.problems.is_empty() {
        return Err(PolicyError { problems: cx.problems, warnings: cx.warnings });
    }
    let digest = data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref());
    Ok(Policy {
        mcp,
        limits,
        roles,
        targets,
        services,
        remotes,
        network,
        agents,
        agents_by_uid: by_uid,
        operators,
        approvals,
        runs,
        templates,
        lifecycle,
        oauth,
        attest,
        directory: 0,
        frozen: Frozen::default(),
        warnings: cx.warnings,
        digest,
        text: text.to_owned(),
    })
}
