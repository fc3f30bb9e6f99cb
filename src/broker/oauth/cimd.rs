//! Client ID metadata documents: a client whose `client_id` is an HTTPS URL is described by the
//! JSON document at that URL (its name, redirect URIs), so it needs no registration. The broker
//! fetches a URL only on a host the policy lists (`oauth.client_id_domains`: the SSRF guard an
//! unauthenticated `client_id` needs), to addresses `network:` allows, over verified TLS, at most
//! 16 KiB within 5 s, and keeps the answer an hour. The document must name itself (`client_id`
//! equal to its URL) and describe a public client (`token_endpoint_auth_method: none`).
//!
//! What runs here: the executor thread (resolution on the blocking pool).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use serde_json::Value;

use super::Client;
use crate::broker::Broker;
use crate::broker::policy::OAuthSettings;
use crate::broker::upstream::conn;

/// Largest document.
const MAX_DOCUMENT: usize = 16 * 1024;
/// Time for the whole fetch.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fetched document is used.
pub const KEEP: Duration = Duration::from_secs(3600);

/// Whether `host` is one of `domains` (exact, or under a `*.domain`).
pub fn host_allowed(domains: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    domains.iter().any(|d| match d.strip_prefix("*.") {
        Some(parent) => host.strip_suffix(parent).is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => *d == host,
    })
}

/// Checks the shape of a URL client id: https, a host, a path, no user info, query, fragment
/// or dot segments.
pub fn url_ok(id: &str) -> Result<http::Uri, String> {
    if id.len() > 2000 || id.contains('#') || id.contains('?') || id.chars().any(|c| c.is_control() || c == ' ') {
        return Err("a URL client_id has no query, fragment or spaces".into());
    }
    let u: http::Uri = id.parse().map_err(|e| format!("client_id: {e}"))?;
    if u.scheme_str() != Some("https") {
        return Err("a URL client_id must be https".into());
    }
    if u.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("a URL client_id carries no user info".into());
    }
    if u.host().is_none_or(str::is_empty) {
        return Err("a URL client_id needs a host".into());
    }
    let path = u.path();
    if path.len() <= 1 || path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("a URL client_id needs a path without dot segments".into());
    }
    Ok(u)
}

/// The client the document at `id` describes (fetched, or kept from a fetch within [`KEEP`]).
pub async fn client(broker: &Broker, s: &OAuthSettings, id: &str) -> Result<Client, String> {
    if s.client_id_domains.is_empty() {
        return Err("client ID metadata documents are off here (oauth.client_id_domains): register the client".into());
    }
    let u = url_ok(id)?;
    let host = u.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    if !host_allowed(&s.client_id_domains, &host) {
        return Err(format!("{host} is not in oauth.client_id_domains"));
    }
    if let Some(c) = broker.oauth.document(id) {
        return Ok(c);
    }
    let fetched = futures_lite::future::or(fetch(broker, s, &u, &host), async {
        crate::broker::deadline::Deadline::after(TIMEOUT).await;
        Err(format!("no answer within {}s", TIMEOUT.as_secs()))
    })
    .await;
    let outcome = match &fetched {
        Ok(_) => serde_json::json!({ "ok": true }),
        Err(e) => serde_json::json!({ "ok": false, "error": e }),
    };
    let ev = crate::broker::audit::Event::new(crate::broker::audit::Kind::Agent, "oauth_client_document")
        .action(serde_json::json!({ "client_id": id }))
        .outcome(outcome);
    broker.audit_now(ev).await;
    let doc = fetched?;
    let c = parse(id, &doc)?;
    broker.oauth.keep_document(c.clone());
    Ok(c)
}

async fn fetch(broker: &Broker, s: &OAuthSettings, u: &http::Uri, host: &str) -> Result<Vec<u8>, String> {
    let port = u.port_u16().unwrap_or(443);
    let policy = broker.policy();
    let addrs = conn::resolve(&broker.pool, host, port, TIMEOUT).await?;
    let allowed: Vec<std::net::IpAddr> = addrs.iter().copied().filter(|ip| policy.network.check(*ip).is_ok()).collect();
    if allowed.is_empty() {
        let why = addrs.first().map_or_else(|| "no address".to_owned(), |ip| policy.network.check(*ip).unwrap_err());
        return Err(format!("{host}: {why}"));
    }
    let conns = broker.oauth.conns();
    let tls =
        conns.tls_config(&broker.pool, "oauth-client-id-documents", s.client_id_ca_file.as_deref(), None, None).await?;
    let dest = conn::Dest { host, port, addrs: &allowed, tls: Some(tls), timeout: TIMEOUT };
    let mut sender = conns.connect(&dest).await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method("GET")
        .uri(u.path())
        .header(http::header::HOST, u.authority().map_or(host, |a| a.as_str()))
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, concat!("ephyr/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("the document's server answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|_| format!("the document is larger than {MAX_DOCUMENT} bytes or was cut off"))?;
    Ok(body.to_bytes().to_vec())
}

/// The client a document describes, if it is acceptable.
pub fn parse(id: &str, doc: &[u8]) -> Result<Client, String> {
    let v: Value = serde_json::from_slice(doc).map_err(|e| format!("the document is not JSON: {e}"))?;
    if v["client_id"].as_str() != Some(id) {
        return Err(format!("the document names client_id {}, not its own URL", v["client_id"]));
    }
    match v["token_endpoint_auth_method"].as_str() {
        None | Some("none") => {}
        Some(m) => {
            return Err(format!("token_endpoint_auth_method {m:?}: only public clients (none) are accepted this way"));
        }
    }
    let uris: Vec<String> = match v["redirect_uris"].as_array() {
        Some(a) if !a.is_empty() && a.len() <= 10 => a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect(),
        _ => return Err("redirect_uris: the document needs 1-10".into()),
    };
    for u in &uris {
        super::redirect_uri_ok(u)?;
    }
    let name: String = v["client_name"].as_str().unwrap_or(id).chars().filter(|c| !c.is_control()).take(100).collect();
    Ok(Client { id: id.to_owned(), secret: None, name, redirect_uris: uris, at: crate::time::now().secs() })
}

/// A kept document's client, while it is fresh.
pub fn fresh(kept: &(Client, Instant)) -> Option<Client> {
    (kept.1.elapsed() < KEEP).then(|| kept.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_hosts_and_clean_urls() {
        let d = vec!["claude.ai".to_owned(), "*.example.com".to_owned()];
        assert!(host_allowed(&d, "claude.ai") && host_allowed(&d, "App.Example.com"));
        for h in ["example.com", "evil-claude.ai", "claude.ai.evil", "xexample.com", ".example.com"] {
            assert!(!host_allowed(&d, h), "{h}");
        }
        assert!(url_ok("https://claude.ai/oauth/client.json").is_ok());
        for bad in [
            "http://claude.ai/c",
            "https://claude.ai",
            "https://claude.ai/",
            "https://u@claude.ai/c",
            "https://claude.ai/a/../b",
            "https://claude.ai/c?x=1",
            "https://claude.ai/c#f",
        ] {
            assert!(url_ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_document_must_name_itself_and_be_public() {
        let id = "https://claude.ai/c";
        let ok =
            br#"{"client_id":"https://claude.ai/c","client_name":"Claude","redirect_uris":["https://claude.ai/cb"]}"#;
        assert_eq!(parse(id, ok).unwrap().name, "Claude");
        for (doc, why) in [
            (&br#"{"client_id":"https://evil/c","redirect_uris":["https://x/cb"]}"#[..], "not its own URL"),
            (br#"{"client_id":"https://claude.ai/c","redirect_uris":["https://x/cb"],"token_endpoint_auth_method":"client_secret_post"}"#, "only public"),
            (br#"{"client_id":"https://claude.ai/c","redirect_uris":["http://evil.example/cb"]}"#, "must be https"),
            (br#"{"client_id":"https://claude.ai/c"}"#, "redirect_uris"),
            (b"<html>", "not JSON"),
        ] {
            assert!(parse(id, doc).unwrap_err().contains(why), "{why}");
        }
    }
}
