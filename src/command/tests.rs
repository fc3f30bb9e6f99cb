use super::*;

/// The command table's policy (tests/data/commands-policy.yaml).
fn table_policy() -> CommandPolicy {
    let file: CommandsFile = serde_yaml_ng::from_str(include_str!("../../tests/data/commands-policy.yaml")).unwrap();
    CommandPolicy::compile(Some(&file), &[], &[]).unwrap().unwrap()
}

/// The table's rows: (expected, command).
fn table() -> Vec<(&'static str, String)> {
    include_str!("../../tests/data/commands.tsv")
        .lines()
        .filter(|l| !l.starts_with("//") && !l.is_empty())
        .map(|l| {
            let (want, cmd) = l.split_once('\t').unwrap();
            (want, cmd.replace('⏎', "\n").replace('␍', "\r"))
        })
        .collect()
}

fn check(p: &CommandPolicy, cmd: &str) -> Result<(), Refusal> {
    Parsed::parse(cmd).and_then(|parsed| p.check(&parsed, cmd))
}

fn outcome(p: &CommandPolicy, cmd: &str) -> String {
    match check(p, cmd) {
        Ok(()) => "ok".into(),
        Err(r) => r.reason.as_str().into(),
    }
}

#[test]
fn the_command_table() {
    let p = table_policy();
    let rows = table();
    assert!(rows.len() >= 60, "the table has {} rows", rows.len());
    let wrong: Vec<String> = rows
        .iter()
        .filter_map(|(want, cmd)| {
            let got = outcome(&p, cmd);
            (got != *want).then(|| format!("{cmd:?}: want {want}, got {got} ({:?})", check(&p, cmd).err()))
        })
        .collect();
    assert!(wrong.is_empty(), "{} rows differ:\n{}", wrong.len(), wrong.join("\n"));
}

#[test]
fn words_get_the_shells_values() {
    let w = |s: &str| Parsed::parse(s).unwrap().commands[0].words.iter().map(|w| w.value.clone()).collect::<Vec<_>>();
    assert_eq!(w(r#"echo 'a b' "c d" e\ f"#), ["echo", "a b", "c d", "e f"]);
    // Inside double quotes bash keeps the backslash before ' (two characters).
    assert_eq!(w(r#"echo "a\'b" "a\"b" "a\$b" "a\\b" "a\nb""#), ["echo", r"a\'b", r#"a"b"#, "a$b", r"a\b", r"a\nb"]);
    assert_eq!(w(r"r\m x\;y"), ["rm", "x;y"]);
    assert_eq!(w("l''s \"\"''x"), ["ls", "x"]);
}

#[test]
fn the_refusal_names_the_node() {
    let p = table_policy();
    let r = check(&p, "ls /etc && bash -c 'id' | wc").unwrap_err();
    assert_eq!(r.reason, Reason::Wrapper);
    assert_eq!(r.node, "bash -c 'id'");
    let r = check(&p, "echo ok; cat /etc/shadow").unwrap_err();
    assert_eq!((r.reason, r.node.as_str()), (Reason::ArgumentsNotAllowed, "cat /etc/shadow"));
    assert!(r.detail.contains("cat /etc/nginx/*..."), "{}", r.detail);
}

#[test]
fn structure_switches() {
    let mut p = table_policy();
    p.pipelines = false;
    assert_eq!(outcome(&p, "ls | grep x"), "pipeline");
    assert_eq!(outcome(&p, "ls; ls"), "ok");
    p.lists = false;
    assert_eq!(outcome(&p, "ls; ls"), "list");
    assert_eq!(outcome(&p, "ls⏎ls".replace('⏎', "\n").as_str()), "list");
    p.redirections = true;
    assert_eq!(outcome(&p, "echo x > /tmp/x"), "ok");
    assert_eq!(outcome(&p, "echo x > /tmp/*"), "glob");
    assert_eq!(outcome(&p, "echo x > $HOME/x"), "expansion");
    p.globs = true;
    assert_eq!(outcome(&p, "ls /etc/*"), "ok");
    // The program itself must still be a literal.
    assert_eq!(outcome(&p, "/bin/l? /etc"), "program_not_literal");
}

#[test]
fn released_wrappers_still_refuse_denied_programs() {
    let file: CommandsFile = serde_yaml_ng::from_str("allow: ['sudo *', 'sudo * ...']\ndeny: [rm]").unwrap();
    let p = CommandPolicy::compile(Some(&file), &[], &[]).unwrap().unwrap();
    assert_eq!(outcome(&p, "sudo id"), "ok");
    assert_eq!(outcome(&p, "sudo /bin/rm"), "program_denied");
    // A repeating rule does not release a wrapper: every word must be written in the rule.
    assert_eq!(outcome(&p, "sudo id -u"), "wrapper");
}

#[test]
fn legacy_globs_are_checked_per_simple_command() {
    let p = CommandPolicy::compile(None, &["ls *".into(), "uptime".into()], &["*reboot*".into()]).unwrap().unwrap();
    assert_eq!(outcome(&p, "ls /etc"), "ok");
    assert_eq!(outcome(&p, "uptime; ls /etc"), "ok");
    // The old whole-string glob `ls *` allowed these; per simple command it does not.
    assert_eq!(outcome(&p, "ls /etc; rm -rf /"), "program_not_allowed");
    assert_eq!(outcome(&p, "ls /etc && bash -c id"), "wrapper");
    assert_eq!(outcome(&p, "ls $(id)"), "command_substitution");
    assert_eq!(outcome(&p, "uptime; systemctl reboot"), "program_denied");
    // `command_deny` also sees the command as sent.
    assert_eq!(outcome(&p, "ls 'reboot'"), "program_denied");
}

#[test]
fn no_policy_leaves_commands_unchecked() {
    assert_eq!(CommandPolicy::compile(None, &[], &[]).unwrap(), None);
}

#[test]
fn bad_rules_are_refused_with_their_key() {
    let f = |y: &str| {
        let file: CommandsFile = serde_yaml_ng::from_str(y).unwrap();
        CommandPolicy::compile(Some(&file), &[], &[]).unwrap_err()
    };
    assert_eq!(f("allow: ['']").0, "allow");
    assert_eq!(f("allow: ['ls... x']").0, "allow");
    assert_eq!(f("allow: ['ls a... b']").0, "allow");
    assert_eq!(f("deny: ['/bin/rm']").0, "deny");
    assert_eq!(f("deny: ['']").0, "deny");
}

#[test]
fn hostile_inputs_are_refused_without_panicking() {
    let p = table_policy();
    let long = "ls ".repeat(MAX_COMMAND_LEN / 3 + 1);
    assert_eq!(outcome(&p, &long), "too_long");
    // Deep nesting within the length cap: refused, no stack exhaustion.
    for open in [
        "(",
        "$(",
        "{ ",
        "`",
        "\"$(",
        "<(",
        "$((",
        "${",
        "[[ ",
        "if true; then ",
        "while true; do ",
        "until a; do ",
        "for x in a; do ",
        "case x in x) ",
        "select x in a; do ",
        "function f ",
        "f() ",
    ] {
        let cmd = open.repeat(MAX_COMMAND_LEN / open.len() / 2);
        let got = outcome(&p, &cmd);
        assert_ne!(got, "ok", "{open}");
    }
    // Long flat chains stay within the stack too.
    for sep in [" | ", " && ", " || ", "; ", "\n", " ! "] {
        let cmd = format!("ls{sep}").repeat(MAX_COMMAND_LEN / (sep.len() + 2) - 1) + "ls";
        let got = outcome(&p, &cmd);
        assert!(["ok", "parse_error", "too_long"].contains(&got.as_str()), "{sep:?}: {got}");
    }
    // Found by the fuzz target: brush-parser unwraps a descriptor number past u32.
    let crash = String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/crash-io-number").to_vec()).unwrap();
    assert_eq!(outcome(&p, &crash), "parse_error");
    assert_eq!(outcome(&p, "ls 99999999999>x"), "parse_error");
    assert_eq!(outcome(&p, "ls 2>/dev/null"), "ok");
    // Found by the fuzz target: an unterminated here-document made brush-parser allocate forever.
    let oom = String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/oom-here-doc").to_vec()).unwrap();
    assert_eq!(outcome(&p, &oom), "here_document");
    // Found by the fuzz target: inside `${...}` quotes nest, so a `<<` that looks quoted reached
    // the parser's here-document path, which unwrapped past the end of input. No `<<` reaches
    // the parser now, quoted or not.
    let unwrap =
        String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/crash-unwrap-in-braced-expansion").to_vec())
            .unwrap();
    assert_eq!(outcome(&p, &unwrap), "here_document");
    assert_eq!(outcome(&p, "echo 'a<<b' \"c<<d\""), "here_document");
    // Found by the fuzz target: brush-parser's word grammar backtracks without memory; after a
    // leading `~` it re-read 297 bytes of single-quoted `${`, `$((` and backquotes as openers for
    // 87 s (a fuzz build), the broker's one thread with it. An unquoted `~` and the first nesting
    // opener outside single quotes are refused before the word parser sees the word.
    let slow =
        String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/slow-nested-expansions").to_vec()).unwrap();
    assert_eq!(outcome(&p, &slow), "expansion");
    // Found by the fuzz target: a `"` inside a comment made the prescan take the rest for
    // quoted, so twenty `(` reached the parser, which took seconds over them.
    let comment =
        String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/slow-quote-in-comment").to_vec()).unwrap();
    assert_eq!(outcome(&p, &comment), "too_deep");
    assert_eq!(outcome(&p, "ls # a \"comment\"\n(((((x)))))"), "too_deep");
    assert_eq!(outcome(&p, "ls a#\"b\""), "ok");
    // Found by the fuzz target: a `"` inside an extended glob (which the tokenizer takes raw)
    // made the prescan take the rest for quoted, so forty `(` reached the parser.
    let extglob =
        String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/slow-quote-in-extglob").to_vec()).unwrap();
    assert_eq!(outcome(&p, &extglob), "too_deep");
    assert_eq!(outcome(&p, "ls ?(\")((((((x)))))"), "too_deep");
    // Found by the fuzz target: a `#` inside backquotes is text to the tokenizer, but the
    // prescan skipped the rest of the line as a comment, closing backquote and nesting included.
    let backquote =
        String::from_utf8(include_bytes!("../../fuzz/seeds/shell_command/slow-comment-in-backquotes").to_vec())
            .unwrap();
    assert_eq!(outcome(&p, &backquote), "too_deep");
    assert_eq!(outcome(&p, "ls `a\n#b` ((((((x))))))"), "too_deep");
    assert_eq!(outcome(&p, "ls ${a\n#b} ((((((x))))))"), "too_deep");
    assert_eq!(outcome(&p, "ls # (((((((\nls"), "ok");
    // Not counted: parens inside a closed extended glob, or quoted after it (a glob, not too deep).
    assert_eq!(outcome(&p, "ls @(a|b) \"(((((\""), "glob");
    for (cmd, reason) in [
        ("echo ${a/$(b)/`c`}", "expansion"),
        ("echo \"x$((1+$((2))))\"", "expansion"),
        ("echo a`b`", "command_substitution"),
        ("echo \"$(x)\"", "command_substitution"),
        ("echo $'a\\'' x", "ansi_c_quote"),
        ("echo $\"a\"", "expansion"),
        ("echo \\$x \\`x\\`", "ok"),
        ("echo '${a} $(b) `c` $((d))'", "ok"),
        ("echo \"it's\" '$(x)'", "ok"),
        ("echo a~b", "expansion"),
        ("echo \"~\" '~' \\~", "ok"),
        ("echo $$'x'", "expansion"),
    ] {
        assert_eq!(outcome(&p, cmd), reason, "{cmd}");
    }
    for cmd in ["", " ", ";", "&&", "|", "\0", "ls\0rm", "'", "\"", "`", "$(", "\\", "ls \\", "a=b", ">x", "2>&1"] {
        assert_ne!(outcome(&p, cmd), "ok", "{cmd:?}");
    }
}
