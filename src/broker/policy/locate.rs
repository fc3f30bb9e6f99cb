//! Finds where a key path (`agents.claude.ssh.web.roles`) is written in a YAML text, so that
//! validation errors can say `file:line:column`.
//!
//! serde's YAML values carry no positions, so we scan the text: each path segment is looked for as a
//! `key:` at the next indentation level inside its parent's block. This covers block-style YAML
//! (what policies are written in). Inside a flow mapping (`{a: 1}`) it returns the deepest block
//! key it found, which is still the right line.

/// 1-based line and column.
pub type Position = (usize, usize);

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

fn key_matches(rest: &str, key: &str) -> bool {
    let rest = rest.strip_prefix("- ").unwrap_or(rest);
    for quoted in [format!("{key}:"), format!("\"{key}\":"), format!("'{key}':")] {
        if let Some(after) = rest.strip_prefix(quoted.as_str()) {
            return after.is_empty() || after.starts_with(' ') || after.starts_with('\t');
        }
    }
    false
}

/// Position of the deepest segment of `path` found in `text` (None if not even the first is).
pub fn locate(text: &str, path: &[&str]) -> Option<Position> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut start, mut end, mut parent_indent): (usize, usize, isize) = (0, lines.len(), -1);
    let mut found = None;
    for key in path {
        // The direct children of the current block share the indentation of its first entry.
        let child_indent = lines[start..end].iter().find(|l| !is_blank(l)).map(|l| indent(l));
        let Some(child_indent) = child_indent.filter(|ci| *ci as isize > parent_indent) else { break };
        let hit = (start..end).find(|&i| {
            let l = lines[i];
            !is_blank(l) && indent(l) == child_indent && key_matches(&l[child_indent..], key)
        });
        let Some(i) = hit else { break };
        found = Some((i + 1, child_indent + 1));
        parent_indent = child_indent as isize;
        start = i + 1;
        end = (start..lines.len())
            .find(|&j| !is_blank(lines[j]) && indent(lines[j]) as isize <= parent_indent)
            .unwrap_or(lines.len());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version: 1\n# comment\nagents:\n  claude:\n    ssh:\n      web: {roles: [read]}\n      \"*\":\n        roles: [op]\n  other:\n    ssh:\n      web:\n        roles: []\ntargets:\n  web:\n    host: x\n";

    #[test]
    fn finds_nested_keys_in_their_own_blocks() {
        assert_eq!(locate(DOC, &["agents"]), Some((3, 1)));
        assert_eq!(locate(DOC, &["agents", "claude", "ssh", "web"]), Some((6, 7)));
        assert_eq!(locate(DOC, &["agents", "claude", "ssh", "*", "roles"]), Some((8, 9)));
        // Same key under another parent is not confused with the first one.
        assert_eq!(locate(DOC, &["agents", "other", "ssh", "web", "roles"]), Some((12, 9)));
        assert_eq!(locate(DOC, &["targets", "web", "host"]), Some((15, 5)));
        // Inside a flow mapping: the deepest block key.
        assert_eq!(locate(DOC, &["agents", "claude", "ssh", "web", "roles"]), Some((6, 7)));
        assert_eq!(locate(DOC, &["nope"]), None);
        assert_eq!(locate(DOC, &["targets", "db"]), Some((13, 1)));
    }
}
