//! HTML for the console: escaping, the page frame, and small builders. Everything the console
//! shows passes through [`esc`]; pages carry no inline script or style (the CSP forbids both),
//! only `/assets/console.css` and `/assets/console.js`.

use std::fmt::Write as _;

use super::auth::Operator;
use crate::broker::policy::OperatorRole;

/// `s` with HTML's special characters escaped (text and quoted attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a URL query value (everything but unreserved characters percent-encoded).
pub fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The views, in the navigation's order: (path, label).
pub const VIEWS: [(&str, &str); 11] = [
    ("/", "Overview"),
    ("/approvals", "Approvals"),
    ("/agents", "Agents"),
    ("/tasks", "Tasks"),
    ("/ssh", "SSH"),
    ("/recordings", "Recordings"),
    ("/remotes", "Services & remotes"),
    ("/audit", "Audit"),
    ("/graphs", "Metrics"),
    ("/policy", "Policy"),
    ("/inspect", "Token inspector"),
];

/// A whole page: head, navigation (with `active` marked), the operator and sign-out, `body`.
pub fn page(title: &str, active: &str, op: Option<&Operator>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · ephyr</title><link rel=\"icon\" href=\"/assets/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/assets/console.css\">\
         <script src=\"/assets/console.js\" defer></script></head><body>",
        esc(title)
    );
    if let Some(op) = op {
        out.push_str("<header><a class=\"brand\" href=\"/\">ephyr</a><nav aria-label=\"Views\"><ul>");
        for (path, label) in VIEWS {
            let cur = if path == active { " aria-current=\"page\"" } else { "" };
            let _ = write!(out, "<li><a href=\"{path}\"{cur}>{}</a></li>", esc(label));
        }
        let _ = write!(
            out,
            "</ul></nav><form class=\"who\" method=\"post\" action=\"/logout\">{}<span>{} ({})</span>\
             <button type=\"submit\">Sign out</button></form></header>",
            csrf_field(op),
            esc(&op.name),
            op.role.as_str()
        );
    }
    let _ = write!(out, "<main><h1>{}</h1>{body}</main></body></html>", esc(title));
    out
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(op: &Operator) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(&op.csrf))
}

/// A one-button form posting to `action` with hidden `fields` (admins only; viewers see nothing).
pub fn button(op: &Operator, action: &str, fields: &[(&str, &str)], label: &str, danger: bool) -> String {
    if op.role != OperatorRole::Admin {
        return String::new();
    }
    let mut out = format!("<form class=\"inline\" method=\"post\" action=\"{}\">{}", esc(action), csrf_field(op));
    for (k, v) in fields {
        let _ = write!(out, "<input type=\"hidden\" name=\"{}\" value=\"{}\">", esc(k), esc(v));
    }
    let class = if danger { " class=\"danger\"" } else { "" };
    let _ = write!(out, "<button type=\"submit\"{class}>{}</button></form>", esc(label));
    out
}

/// A table: `head` column names, `rows` already-escaped cells; `empty` when there are none.
pub fn table(head: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"muted\">{}</p>", esc(empty));
    }
    let mut out = String::from("<div class=\"scroll\"><table><thead><tr>");
    for h in head {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{c}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
    out
}

/// A status badge (`ok`, `warn`, `bad`, or `muted`).
pub fn badge(kind: &str, text: &str) -> String {
    format!("<span class=\"badge {kind}\">{}</span>", esc(text))
}

/// A link to the audit lines about something (`key` = `agent`, `task`, `target`, ...).
pub fn audit_link(key: &str, value: &str) -> String {
    format!("<a class=\"audit\" href=\"/audit?{key}={}\">audit</a>", q(value))
}

/// A message box (`ok` or `bad`) with lines of text.
pub fn notice(kind: &str, lines: &[String]) -> String {
    let mut out = format!("<div class=\"notice {kind}\" role=\"status\">");
    for l in lines {
        let _ = write!(out, "<p>{}</p>", esc(l));
    }
    out.push_str("</div>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc("<script>alert('x')</script>&\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;");
        assert_eq!(q("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
