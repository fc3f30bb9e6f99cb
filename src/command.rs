//! SSH command policy on a shell syntax tree: what a command an agent sends would run, judged
//! before a certificate is signed for it.
//!
//! Pure, like `authorize`. [`Parsed::parse`] reads the command as the target's login shell would
//! (bash grammar, via `brush-parser`) and keeps only what it can judge exactly: simple commands
//! whose words are literals after quote removal, joined by pipes and `;`/`&&`/`||`/newlines, with
//! file redirections. Everything else is refused with a [`Reason`] and the offending node:
//! substitutions, parameter/arithmetic/tilde expansion, ANSI-C quotes, brace expansion, here
//! documents, compound commands, functions, background jobs, assignments in front of a command.
//! [`CommandPolicy::check`] then checks every simple command: denied programs (by base name,
//! however the path is spelled), wrappers and interpreters that would run a command the checker
//! cannot see (`sh -c`, `sudo`, `env`, `xargs`, `find -exec`, `python -c`, ...), unquoted globs,
//! and the allow rules, word by word.
//!
//! Word values are computed with bash's rules, not the parser's (inside double quotes `\'` stays
//! two characters): the program and arguments checked are the ones the shell will use.
//!
//! Used by the broker's `authorize` (targets and roles, task tokens) and by the signer before it
//! signs an exec envelope for a target that verifies commands itself; it depends on nothing else
//! of ours.

use std::fmt;

use brush_parser::ast;
use brush_parser::word::WordPiece;

use serde::Deserialize;

/// Longest command the checker reads (longer ones are refused, not truncated).
pub const MAX_COMMAND_LEN: usize = 8192;

/// `commands:` of a target or a role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsFile {
    /// Rules `program arg-pattern ... [pattern...]`; with any, every simple command must match one.
    pub allow: Option<Vec<String>>,
    /// Denied programs (globs over the base name).
    pub deny: Option<Vec<String>>,
    /// Pipelines allowed (default true).
    pub pipelines: Option<bool>,
    /// `;` `&&` `||` lists allowed (default true).
    pub lists: Option<bool>,
    /// File redirections allowed (default false).
    pub redirections: Option<bool>,
    /// Unquoted globs in arguments allowed (default false).
    pub globs: Option<bool>,
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

/// Why a command is refused (stable, machine-readable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The shell grammar does not accept it.
    ParseError,
    /// Longer than [`MAX_COMMAND_LEN`].
    TooLong,
    /// Nothing to run.
    Empty,
    /// More nested constructs than the checker reads (each would be refused anyway).
    TooDeep,
    /// A control character (other than tab and newline between words), or a newline in a word.
    ControlCharacter,
    /// A backslash-newline line continuation.
    LineContinuation,
    /// `$(...)` or backquotes.
    CommandSubstitution,
    /// `<(...)` or `>(...)`.
    ProcessSubstitution,
    /// `$VAR`, `${...}`, `$((...))`, `~`, `$"..."`: a value only the target knows.
    Expansion,
    /// `$'...'` (shells disagree on it).
    AnsiCQuote,
    /// `{a,b}` or `{1..9}` outside quotes.
    BraceExpansion,
    /// An unquoted `*`, `?`, `[` or extended glob where the policy needs a literal.
    Glob,
    /// `<<` or `<<<`.
    HereDocument,
    /// `( )`, `{ }`, `if`, `for`, `while`, `until`, `case`, `[[ ]]`, `(( ))`.
    CompoundCommand,
    /// `name() { ... }`.
    FunctionDefinition,
    /// A command ending in `&`.
    Background,
    /// `NAME=value` in front of a command (`LD_PRELOAD=`, `PATH=`).
    Assignment,
    /// `eval`, `source`, `.`, `trap`.
    Eval,
    /// A builtin that changes how later commands run (`hash`, `enable`, `alias`, `shopt`, `set`,
    /// or `export`/`declare` of `PATH`, `LD_*`, `IFS`, `BASH_ENV`, ...).
    ShellState,
    /// A program that runs another command (`sh -c`, `sudo`, `env`, `xargs`, `exec`, ...).
    Wrapper,
    /// An interpreter that runs code (`python`, `perl`, `awk`, `node`, ...).
    Interpreter,
    /// `find` with `-exec`, `-execdir`, `-ok`, `-okdir` or `-delete`.
    FindExec,
    /// A pipeline where the policy allows none.
    Pipeline,
    /// A `;`, `&&`, `||` or newline list where the policy allows none.
    List,
    /// A redirection to or from a file where the policy allows none.
    Redirection,
    /// The program word is not a plain literal.
    ProgramNotLiteral,
    /// The program is denied.
    ProgramDenied,
    /// No allow rule names the program.
    ProgramNotAllowed,
    /// Rules name the program, but none accepts these arguments.
    ArgumentsNotAllowed,
}

impl Reason {
    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ParseError => "parse_error",
            Reason::TooLong => "too_long",
            Reason::Empty => "empty",
            Reason::TooDeep => "too_deep",
            Reason::ControlCharacter => "control_character",
            Reason::LineContinuation => "line_continuation",
            Reason::CommandSubstitution => "command_substitution",
            Reason::ProcessSubstitution => "process_substitution",
            Reason::Expansion => "expansion",
            Reason::AnsiCQuote => "ansi_c_quote",
            Reason::BraceExpansion => "brace_expansion",
            Reason::Glob => "glob",
            Reason::HereDocument => "here_document",
            Reason::CompoundCommand => "compound_command",
            Reason::FunctionDefinition => "function_definition",
            Reason::Background => "background",
            Reason::Assignment => "assignment",
            Reason::Eval => "eval",
            Reason::ShellState => "shell_state",
            Reason::Wrapper => "wrapper",
            Reason::Interpreter => "interpreter",
            Reason::FindExec => "find_exec",
            Reason::Pipeline => "pipeline",
            Reason::List => "list",
            Reason::Redirection => "redirection",
            Reason::ProgramNotLiteral => "program_not_literal",
            Reason::ProgramDenied => "program_denied",
            Reason::ProgramNotAllowed => "program_not_allowed",
            Reason::ArgumentsNotAllowed => "arguments_not_allowed",
        }
    }
}

/// A refusal: the reason, the node of the command it is about, and why in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Machine reason.
    pub reason: Reason,
    /// The offending part of the command, as written (or as the parser prints it).
    pub node: String,
    /// For humans.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) at {:?}", self.detail, self.reason.as_str(), self.node)
    }
}

fn refuse(reason: Reason, node: impl Into<String>, detail: impl Into<String>) -> Refusal {
    Refusal { reason, node: node.into(), detail: detail.into() }
}

/// One word after quote removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Word {
    /// Its value as the shell passes it to the program (quotes removed).
    pub value: String,
    /// It has an unquoted glob character: the shell may replace it by file names.
    pub glob: bool,
}

/// A file redirection of a simple command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The operator as written (`>`, `>>`, `<`, `&>`, ...).
    pub op: String,
    /// The file (a literal).
    pub target: Word,
}

/// One simple command: a program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Simple {
    /// Program first.
    pub words: Vec<Word>,
    /// File redirections (descriptor duplications such as `2>&1` are not listed).
    pub redirects: Vec<Redirect>,
    /// The command as the parser prints it (for messages).
    pub text: String,
}

impl Simple {
    /// The program word.
    pub fn program(&self) -> &str {
        &self.words[0].value
    }

    /// The words joined by single spaces (what the legacy whole-command globs are matched against).
    pub fn joined(&self) -> String {
        self.words.iter().map(|w| w.value.as_str()).collect::<Vec<_>>().join(" ")
    }
}

/// A command the checker can judge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Every simple command, in order.
    pub commands: Vec<Simple>,
    /// Some pipeline has more than one command.
    pub pipeline: bool,
    /// More than one pipeline (`;`, `&&`, `||`, newline).
    pub list: bool,
}

impl Parsed {
    /// Parses `command` as the target's shell would, refusing what cannot be judged.
    pub fn parse(command: &str) -> Result<Parsed, Refusal> {
        if command.len() > MAX_COMMAND_LEN {
            return Err(refuse(
                Reason::TooLong,
                "",
                format!("the command is {} bytes; the checker reads at most {MAX_COMMAND_LEN}", command.len()),
            ));
        }
        if let Some(c) = command.chars().find(|c| (c.is_control() && *c != '\t' && *c != '\n') || *c == '\u{7f}') {
            return Err(refuse(Reason::ControlCharacter, format!("{c:?}"), "the command has a control character"));
        }
        if command.contains("\\\n") {
            return Err(refuse(Reason::LineContinuation, "\\⏎", "backslash-newline continues a line; write one line"));
        }
        if let Some(n) = huge_descriptor(command) {
            // brush-parser 0.2.18 unwraps the parse of a redirection's descriptor number (found by
            // the shell_command fuzz target); a number this long is refused before it sees it.
            return Err(refuse(Reason::ParseError, n, "a redirection's descriptor number is too large"));
        }
        let pre = prescan(command);
        if command.contains("<<") {
            // Refused anyway; and brush-parser 0.2.18 loops allocating on some unterminated ones
            // (`c<<"'" #;`) and unwraps past the end of input on one inside `${...}`, where quotes
            // nest so that a `<<` that looks quoted is not (`a${x"y"<<o\ ...`; both found by the
            // fuzz target): the parser never sees a `<<`, quoted or not.
            return Err(refuse(Reason::HereDocument, "<<", "here-documents and here-strings are not judged"));
        }
        if pre.openers > MAX_OPENERS {
            return Err(refuse(
                Reason::TooDeep,
                "",
                format!("more than {MAX_OPENERS} subshells, groups or substitutions; none of them is judged"),
            ));
        }
        let mut parser =
            brush_parser::Parser::new(std::io::Cursor::new(command.as_bytes()), &options(), &Default::default());
        let program = parser
            .parse_program()
            .map_err(|e| refuse(Reason::ParseError, "", format!("the shell grammar does not accept it: {e}")))?;
        let mut out = Parsed { commands: Vec::new(), pipeline: false, list: false };
        let mut pipelines = 0usize;
        for complete in &program.complete_commands {
            for ast::CompoundListItem(and_or, sep) in &complete.0 {
                if matches!(sep, ast::SeparatorOperator::Async) {
                    return Err(refuse(
                        Reason::Background,
                        and_or.to_string(),
                        "a command may not run in the background (&)",
                    ));
                }
                for pipeline in std::iter::once(&and_or.first).chain(and_or.additional.iter().map(|a| match a {
                    ast::AndOr::And(p) | ast::AndOr::Or(p) => p,
                })) {
                    pipelines += 1;
                    out.pipeline |= pipeline.seq.len() > 1;
                    for cmd in &pipeline.seq {
                        out.commands.push(simple(cmd)?);
                    }
                }
            }
        }
        out.list = pipelines > 1;
        if out.commands.is_empty() {
            return Err(refuse(Reason::Empty, "", "there is no command"));
        }
        Ok(out)
    }
}

/// Most nesting openers a command may have before the parser sees it. The parser recurses per
/// level (a debug build overflows a 2 MB stack near 32 subshells); every construct counted is
/// refused anyway, so a handful is enough for a precise reason.
const MAX_OPENERS: usize = 4;

/// What a quote-aware walk over the raw command finds before the parser sees it.
struct Prescan {
    /// What can open a nested construct: unquoted `(`, `{`, `` ` ``, `[[`, compound-command
    /// keywords, and `$(`, `${`, `` ` `` inside double quotes (conservative: it may count what is
    /// not one).
    openers: usize,
}

fn prescan(s: &str) -> Prescan {
    let b = s.as_bytes();
    let (mut i, mut dq) = (0, false);
    // Set at the first `` ` ``, `$(` or `${`: inside those the tokenizer takes a `#` as text, not
    // as a comment, and every command with one is refused anyway, so from there on no comment is
    // skipped (one that was hid the nesting after a backquote; found by the fuzz target).
    let mut substituted = false;
    let mut out = Prescan { openers: 0 };
    while i < b.len() {
        match (b[i], dq) {
            (b'\\', _) => i += 1,
            (b'\'', false) => {
                let ansi = i > 0 && b[i - 1] == b'$';
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    if ansi && b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            // A comment runs to the end of the line: a quote in it opens nothing (one that did
            // hid the nesting after it from this count; found by the fuzz target).
            (b'#', false) if !substituted && (i == 0 || b" \t\n;&|()<>".contains(&b[i - 1])) => {
                while i + 1 < b.len() && b[i + 1] != b'\n' {
                    i += 1;
                }
            }
            (b'"', _) => dq = !dq,
            // An extended glob (`?(`, `*(`, `+(`, `@(`, `!(`): brush-parser's tokenizer takes it
            // raw up to the matching `)`, quotes and escapes included, so a quote in it opens
            // nothing (one that did hid the nesting after it from this count; found by the fuzz
            // target).
            (b'(', false) if i > 0 && b"?*+@!".contains(&b[i - 1]) => {
                out.openers += 1;
                let mut depth = 1;
                while depth > 0 && i + 1 < b.len() {
                    i += 1;
                    match b[i] {
                        b'(' => {
                            depth += 1;
                            out.openers += 1;
                        }
                        b')' => depth -= 1,
                        _ => {}
                    }
                }
            }
            (b'(' | b'{' | b'`', false) => {
                substituted |= b[i] == b'`' || (i > 0 && b[i - 1] == b'$');
                out.openers += 1;
            }
            (b'[', false) if b.get(i + 1) == Some(&b'[') => out.openers += 1,
            (b'`', true) => {
                substituted = true;
                out.openers += 1;
            }
            (_, false) if keyword_at(b, i) => out.openers += 1,
            (b'$', true) if matches!(b.get(i + 1), Some(b'(' | b'{')) => {
                substituted = true;
                out.openers += 1;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// A run of 10 or more digits right before `<` or `>` (a descriptor number past `u32`).
fn huge_descriptor(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i - start >= 10 && matches!(b.get(i), Some(b'<' | b'>')) {
                return Some(&s[start..i]);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Whether an unquoted compound-command keyword starts at `i` (`if`, `while`, `for`, ...).
fn keyword_at(b: &[u8], i: usize) -> bool {
    const KEYWORDS: [&[u8]; 7] = [b"if", b"while", b"until", b"for", b"case", b"select", b"function"];
    let starts = i == 0 || b" \t\n;&|(){}!".contains(&b[i - 1]);
    starts
        && KEYWORDS
            .iter()
            .any(|k| b[i..].starts_with(k) && b.get(i + k.len()).is_none_or(|c| b" \t\n;&|(){}".contains(c)))
}

fn options() -> brush_parser::ParserOptions {
    // Bash, as a login shell runs `-c`: extended globs on so that `@(..)` is read as one word
    // (and then refused as a glob) rather than as a syntax the checker would misjudge.
    brush_parser::ParserOptions {
        enable_extended_globbing: true,
        posix_mode: false,
        sh_mode: false,
        tilde_expansion: true,
    }
}

fn simple(cmd: &ast::Command) -> Result<Simple, Refusal> {
    let s = match cmd {
        ast::Command::Simple(s) => s,
        ast::Command::Compound(..) | ast::Command::ExtendedTest(_) => {
            return Err(refuse(
                Reason::CompoundCommand,
                cmd.to_string(),
                "compound commands (subshells, groups, if/for/while/case, [[ ]]) are not judged",
            ));
        }
        ast::Command::Function(_) => {
            return Err(refuse(Reason::FunctionDefinition, cmd.to_string(), "function definitions are not judged"));
        }
    };
    let text = s.to_string();
    let mut out = Simple { words: Vec::new(), redirects: Vec::new(), text: text.clone() };
    let items = s.prefix.iter().flat_map(|p| p.0.iter()).map(|i| (true, i));
    let mut words: Vec<(bool, &ast::CommandPrefixOrSuffixItem)> = items.collect();
    let name = s.word_or_name.as_ref().map(|w| ast::CommandPrefixOrSuffixItem::Word(w.clone()));
    if let Some(n) = &name {
        words.push((false, n));
    }
    words.extend(s.suffix.iter().flat_map(|p| p.0.iter()).map(|i| (false, i)));
    for (in_prefix, item) in words {
        match item {
            ast::CommandPrefixOrSuffixItem::Word(w) => out.words.push(word(&w.value)?),
            ast::CommandPrefixOrSuffixItem::AssignmentWord(_, w) => {
                if in_prefix {
                    return Err(refuse(
                        Reason::Assignment,
                        w.value.clone(),
                        "variable assignments in front of a command change what it runs (PATH=, LD_PRELOAD=)",
                    ));
                }
                out.words.push(word(&w.value)?);
            }
            ast::CommandPrefixOrSuffixItem::ProcessSubstitution(..) => {
                return Err(refuse(
                    Reason::ProcessSubstitution,
                    item.to_string(),
                    "process substitution is not judged",
                ));
            }
            ast::CommandPrefixOrSuffixItem::IoRedirect(r) => {
                if let Some(r) = redirect(r)? {
                    out.redirects.push(r);
                }
            }
        }
    }
    if out.words.is_empty() {
        return Err(refuse(Reason::Empty, text, "a redirection or assignment without a command"));
    }
    Ok(out)
}

/// A file redirection (`None` for descriptor duplications such as `2>&1`, which touch no file).
fn redirect(r: &ast::IoRedirect) -> Result<Option<Redirect>, Refusal> {
    use ast::IoFileRedirectTarget as T;
    match r {
        ast::IoRedirect::HereDocument(..) | ast::IoRedirect::HereString(..) => {
            Err(refuse(Reason::HereDocument, r.to_string(), "here-documents and here-strings are not judged"))
        }
        ast::IoRedirect::OutputAndError(w, append) => {
            Ok(Some(Redirect { op: if *append { "&>>" } else { "&>" }.into(), target: literal_target(r, &w.value)? }))
        }
        ast::IoRedirect::File(_, kind, target) => match target {
            T::Fd(_) => Ok(None),
            T::ProcessSubstitution(..) => {
                Err(refuse(Reason::ProcessSubstitution, r.to_string(), "process substitution is not judged"))
            }
            T::Duplicate(w) => {
                let t = literal_target(r, &w.value)?;
                if t.value == "-" || (!t.value.is_empty() && t.value.bytes().all(|b| b.is_ascii_digit())) {
                    Ok(None)
                } else {
                    // `>&file` writes to a file, like `>file`.
                    Ok(Some(Redirect { op: kind.to_string(), target: t }))
                }
            }
            T::Filename(w) => Ok(Some(Redirect { op: kind.to_string(), target: literal_target(r, &w.value)? })),
        },
    }
}

fn literal_target(r: &ast::IoRedirect, raw: &str) -> Result<Word, Refusal> {
    let w = word(raw)?;
    if w.glob {
        return Err(refuse(Reason::Glob, r.to_string(), "a redirection's file must be a literal"));
    }
    Ok(w)
}

/// A word's value after quote removal, refusing anything expanded on the target.
fn word(raw: &str) -> Result<Word, Refusal> {
    if let Some((reason, detail)) = nesting_expansion(raw) {
        return Err(refuse(reason, raw, detail));
    }
    let pieces = brush_parser::word::parse(raw, &options())
        .map_err(|e| refuse(Reason::ParseError, raw, format!("the word does not parse: {e}")))?;
    let mut out = Word { value: String::new(), glob: false };
    for p in &pieces {
        piece(raw, &p.piece, false, &mut out)?;
    }
    if out.value.contains('\n') {
        return Err(refuse(Reason::ControlCharacter, raw, "a word may not contain a newline"));
    }
    Ok(out)
}

/// The first expansion outside quotes that the word parser could read in more than one way (an
/// unquoted `~`; `$(`, `$((`, `${`, a backquote, `$'`, `$"` outside single quotes), found before
/// the word parser sees the word. Each is refused anyway; and brush-parser 0.2.18's word grammar
/// backtracks without memory: after a leading `~` it re-reads single-quoted `$((` and `${` as
/// openers, so 96 bytes kept it busy for minutes, blocking the broker (found by the shell_command
/// fuzz target). Up to that first opener, quoting is plain: a backslash escapes the next byte
/// outside single quotes, single quotes do not nest and are literal in double quotes.
fn nesting_expansion(raw: &str) -> Option<(Reason, &'static str)> {
    let b = raw.as_bytes();
    let (mut i, mut dq) = (0, false);
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'\\', _) => i += 1,
            (b'\'', _) if !dq => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
            }
            (b'"', _) => dq = !dq,
            (b'~', _) if !dq => return Some((Reason::Expansion, "an unquoted $ or ~ is expanded on the target")),
            (b'$', Some(b'$')) => i += 1,
            (b'`', _) => return Some((Reason::CommandSubstitution, "command substitution is not judged")),
            (b'$', Some(b'(')) if b.get(i + 2) == Some(&b'(') => {
                return Some((Reason::Expansion, "arithmetic expansion is not judged"));
            }
            (b'$', Some(b'(')) => return Some((Reason::CommandSubstitution, "command substitution is not judged")),
            (b'$', Some(b'{')) => return Some((Reason::Expansion, "the word is expanded on the target")),
            (b'$', Some(b'\'')) if !dq => {
                return Some((Reason::AnsiCQuote, "$'...' quoting is not judged (shells disagree on it)"));
            }
            (b'$', Some(b'"')) if !dq => return Some((Reason::Expansion, "the word is expanded on the target")),
            _ => {}
        }
        i += 1;
    }
    None
}

fn piece(raw: &str, p: &WordPiece, quoted: bool, out: &mut Word) -> Result<(), Refusal> {
    match p {
        WordPiece::Text(t) if quoted => out.value.push_str(t),
        WordPiece::Text(t) => {
            if t.contains('$') || t.contains('~') {
                return Err(refuse(Reason::Expansion, raw, "an unquoted $ or ~ is expanded on the target"));
            }
            if t.contains('{') || t.contains('}') {
                return Err(refuse(Reason::BraceExpansion, raw, "an unquoted { or } may be brace expansion; quote it"));
            }
            // `*`, `?`, `[`, and the `(` of an extended glob (`@(a|b)`, `!(x)`).
            out.glob |= t.contains(['*', '?', '[', '(']);
            out.value.push_str(t);
        }
        WordPiece::SingleQuotedText(t) => out.value.push_str(t),
        WordPiece::DoubleQuotedSequence(inner) => {
            for q in inner {
                piece(raw, &q.piece, true, out)?;
            }
        }
        WordPiece::EscapeSequence(s) => {
            let c = s.strip_prefix('\\').unwrap_or(s);
            // Inside double quotes bash removes the backslash only before $ ` " \ (the parser
            // also before '); elsewhere before any character.
            if quoted && !matches!(c, "$" | "`" | "\"" | "\\") {
                out.value.push('\\');
            }
            out.value.push_str(c);
        }
        WordPiece::AnsiCQuotedText(_) => {
            return Err(refuse(Reason::AnsiCQuote, raw, "$'...' quoting is not judged (shells disagree on it)"));
        }
        WordPiece::GettextDoubleQuotedSequence(_) | WordPiece::TildePrefix(_) | WordPiece::ParameterExpansion(_) => {
            return Err(refuse(Reason::Expansion, raw, "the word is expanded on the target"));
        }
        WordPiece::ArithmeticExpression(_) => {
            return Err(refuse(Reason::Expansion, raw, "arithmetic expansion is not judged"));
        }
        WordPiece::CommandSubstitution(_) | WordPiece::BackquotedCommandSubstitution(_) => {
            return Err(refuse(Reason::CommandSubstitution, raw, "command substitution is not judged"));
        }
    }
    Ok(())
}

/// An allow rule: `program arg-pattern ...`, each pattern matching one argument (`*` = any run
/// of characters within the argument); a last pattern ending in `...` repeats for any number of
/// further arguments (`...` alone: any).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AllowRule {
    /// Word by word.
    Words {
        /// The rule as written.
        text: String,
        /// Program pattern, then argument patterns.
        words: Vec<String>,
        /// The repeating last pattern, if any.
        rest: Option<String>,
    },
    /// A legacy `command_allow` glob over the words joined by spaces.
    Joined(String),
}

impl AllowRule {
    /// Reads a word-by-word rule.
    pub fn parse(text: &str) -> Result<AllowRule, String> {
        let mut words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
        if words.is_empty() {
            return Err("an allow rule needs at least a program".into());
        }
        if words[0].ends_with("...") {
            return Err("the program cannot repeat (`...` belongs after the program)".into());
        }
        if let Some(w) = words[..words.len() - 1].iter().find(|w| w.ends_with("...")) {
            return Err(format!("{w:?}: only the last pattern may end in `...`"));
        }
        let rest = match words.last().and_then(|w| w.strip_suffix("...")) {
            Some(r) => {
                let r = if r.is_empty() { "*".to_owned() } else { r.to_owned() };
                words.pop();
                Some(r)
            }
            None => None,
        };
        Ok(AllowRule::Words { text: text.trim().to_owned(), words, rest })
    }

    /// The rule as written.
    pub fn text(&self) -> &str {
        match self {
            AllowRule::Words { text, .. } | AllowRule::Joined(text) => text,
        }
    }

    /// Whether the rule names this program (a wrapper rule must name it literally).
    fn names_program(&self, program: &str) -> bool {
        match self {
            AllowRule::Words { words, .. } => glob(&words[0], program),
            AllowRule::Joined(g) => glob(g.split(' ').next().unwrap_or(""), program),
        }
    }

    /// Whether the rule releases a wrapper: it names the program without a pattern and has a
    /// fixed number of words, so every argument of the wrapped command is written in the rule.
    fn releases_wrapper(&self, program: &str) -> bool {
        matches!(self, AllowRule::Words { words, rest: None, .. } if words[0] == program)
    }

    fn matches(&self, cmd: &Simple) -> bool {
        match self {
            AllowRule::Joined(g) => glob(g, &cmd.joined()),
            AllowRule::Words { words, rest, .. } => {
                let got = &cmd.words;
                if got.len() < words.len() || (rest.is_none() && got.len() != words.len()) {
                    return false;
                }
                words.iter().zip(got).all(|(p, w)| arg_matches(p, &w.value))
                    && got[words.len()..].iter().all(|w| rest.as_deref().is_some_and(|r| arg_matches(r, &w.value)))
            }
        }
    }
}

/// One pattern against one argument. A pattern with a `/` never matches an argument with a `..`
/// path segment: `/etc/nginx/*` does not reach `/etc/nginx/../shadow`.
fn arg_matches(pattern: &str, arg: &str) -> bool {
    if pattern.contains('/') && arg.split('/').any(|seg| seg == "..") {
        return false;
    }
    glob(pattern, arg)
}

/// A target's or role's command policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandPolicy {
    /// With any rule, every simple command must match one.
    pub allow: Vec<AllowRule>,
    /// Denied programs: globs over the program's base name.
    pub deny: Vec<String>,
    /// Legacy `command_deny`: globs over a simple command's words joined by spaces (and over
    /// the whole command as sent).
    pub deny_joined: Vec<String>,
    /// Pipelines allowed.
    pub pipelines: bool,
    /// `;`/`&&`/`||`/newline lists allowed.
    pub lists: bool,
    /// File redirections allowed (descriptor duplications and `/dev/null` always are).
    pub redirections: bool,
    /// Unquoted globs allowed in arguments.
    pub globs: bool,
}

impl Default for CommandPolicy {
    /// No rules; pipelines and lists allowed; file redirections and unquoted globs refused.
    fn default() -> Self {
        CommandPolicy {
            allow: Vec::new(),
            deny: Vec::new(),
            deny_joined: Vec::new(),
            pipelines: true,
            lists: true,
            redirections: false,
            globs: false,
        }
    }
}

impl CommandPolicy {
    /// Builds a policy from `commands:` and the legacy `command_allow`/`command_deny` globs. `Err`
    /// names the key and what is wrong.
    pub fn compile(
        file: Option<&CommandsFile>,
        legacy_allow: &[String],
        legacy_deny: &[String],
    ) -> Result<Option<CommandPolicy>, (&'static str, String)> {
        if file.is_none() && legacy_allow.is_empty() && legacy_deny.is_empty() {
            return Ok(None);
        }
        let d = CommandPolicy::default();
        let empty = CommandsFile::default();
        let f = file.unwrap_or(&empty);
        let mut allow = Vec::new();
        for r in f.allow.iter().flatten() {
            allow.push(AllowRule::parse(r).map_err(|e| ("allow", format!("rule {r:?}: {e}")))?);
        }
        for g in legacy_allow {
            if g.trim().is_empty() {
                return Err(("command_allow", "patterns must not be empty".into()));
            }
            allow.push(AllowRule::Joined(g.trim().to_owned()));
        }
        let deny = f.deny.clone().unwrap_or_default();
        if let Some(bad) = deny.iter().find(|d| d.trim().is_empty() || d.contains('/') || d.contains(' ')) {
            return Err((
                "deny",
                format!("{bad:?}: a denied program is a base name or a glob over one (no spaces or /)"),
            ));
        }
        if legacy_deny.iter().any(|g| g.trim().is_empty()) {
            return Err(("command_deny", "patterns must not be empty".into()));
        }
        Ok(Some(CommandPolicy {
            allow,
            deny,
            deny_joined: legacy_deny.iter().map(|g| g.trim().to_owned()).collect(),
            pipelines: f.pipelines.unwrap_or(d.pipelines),
            lists: f.lists.unwrap_or(d.lists),
            redirections: f.redirections.unwrap_or(d.redirections),
            globs: f.globs.unwrap_or(d.globs),
        }))
    }
}

/// A task token's `arg.command LIKE [globs]` on an SSH command: each glob set is a legacy
/// allow list (every simple command must match a glob of each set) with the structural checks of
/// a default policy. `Err` says why, with the checker's code.
pub fn check_token_globs(sets: &[std::collections::BTreeSet<String>], command: &str) -> Result<(), String> {
    let parsed = Parsed::parse(command).map_err(|r| r.to_string())?;
    for set in sets {
        let p =
            CommandPolicy { allow: set.iter().map(|g| AllowRule::Joined(g.clone())).collect(), ..Default::default() };
        p.check(&parsed, command).map_err(|r| r.to_string())?;
    }
    Ok(())
}

/// Programs that run another command given in their arguments (or read one from input).
const WRAPPERS: &[&str] = &[
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "mksh",
    "ash",
    "csh",
    "tcsh",
    "fish",
    "busybox",
    "toybox",
    "env",
    "sudo",
    "su",
    "doas",
    "pkexec",
    "runuser",
    "setsid",
    "nohup",
    "timeout",
    "nice",
    "ionice",
    "chroot",
    "unshare",
    "nsenter",
    "stdbuf",
    "time",
    "command",
    "builtin",
    "exec",
    "xargs",
    "parallel",
    "watch",
    "flock",
    "chrt",
    "taskset",
    "systemd-run",
    "script",
    "strace",
    "ltrace",
    "gdb",
    "sg",
    "newgrp",
    "ssh",
    "trap",
    "cgexec",
    "firejail",
    "bwrap",
    "proot",
    "fakeroot",
    "expect",
    "screen",
    "tmux",
    "at",
    "batch",
    "crontab",
];

/// Interpreters: any invocation may run code the checker does not see.
const INTERPRETERS: &[&str] = &[
    "python",
    "perl",
    "ruby",
    "node",
    "nodejs",
    "php",
    "lua",
    "luajit",
    "tclsh",
    "wish",
    "awk",
    "gawk",
    "mawk",
    "nawk",
    "busybox",
    "rscript",
    "deno",
    "bun",
    "pwsh",
    "powershell",
    "jshell",
    "groovy",
    "scala",
    "irb",
    "erl",
    "elixir",
    "guile",
    "racket",
    "sbcl",
    "ghci",
    "osascript",
    "java",
    "vim",
    "vi",
    "nvim",
    "emacs",
    "ed",
    "ex",
];

/// Variables that change which program runs or what a shell does before running it.
fn dangerous_variable(name: &str) -> bool {
    matches!(
        name,
        "PATH"
            | "IFS"
            | "ENV"
            | "BASH_ENV"
            | "SHELLOPTS"
            | "BASHOPTS"
            | "PS4"
            | "PROMPT_COMMAND"
            | "CDPATH"
            | "GLOBIGNORE"
            | "HOME"
            | "SHELL"
            | "PYTHONPATH"
            | "PYTHONSTARTUP"
            | "PERL5LIB"
            | "PERL5OPT"
            | "NODE_OPTIONS"
            | "GIT_SSH_COMMAND"
            | "GIT_EXEC_PATH"
            | "PAGER"
            | "EDITOR"
            | "VISUAL"
            | "LESSOPEN"
    ) || name.starts_with("LD_")
        || name.starts_with("BASH_FUNC_")
        || name.starts_with('-')
}

fn base_name(program: &str) -> &str {
    program.rsplit('/').next().unwrap_or(program)
}

/// `python3.12` → `python`; `perl5.36` → `perl`.
fn unversioned(name: &str) -> &str {
    name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-')
}

fn classify(cmd: &Simple) -> Option<(Reason, &'static str)> {
    let base = base_name(cmd.program());
    let lower = base.to_ascii_lowercase();
    if matches!(base, "eval" | "source" | "." | "trap") {
        return Some((Reason::Eval, "it runs text as shell code"));
    }
    if matches!(base, "hash" | "enable" | "alias" | "unalias" | "shopt" | "set" | "unset" | "ulimit" | "umask") {
        return Some((Reason::ShellState, "it changes how later commands run"));
    }
    if matches!(base, "export" | "declare" | "typeset" | "readonly" | "local")
        && cmd.words[1..].iter().any(|w| dangerous_variable(w.value.split('=').next().unwrap_or("")))
    {
        return Some((Reason::ShellState, "it sets a variable that changes what later commands run"));
    }
    if WRAPPERS.contains(&base) {
        return Some((Reason::Wrapper, "it runs another command the checker does not see"));
    }
    if INTERPRETERS.contains(&unversioned(&lower)) {
        return Some((Reason::Interpreter, "an interpreter runs code the checker does not see"));
    }
    if base == "find"
        && cmd.words[1..]
            .iter()
            .any(|w| matches!(w.value.as_str(), "-exec" | "-execdir" | "-ok" | "-okdir" | "-delete"))
    {
        return Some((Reason::FindExec, "find -exec/-ok/-delete runs or deletes what the checker does not see"));
    }
    None
}

impl CommandPolicy {
    /// Checks a parsed command. `raw` is the command as sent (legacy deny globs see it too).
    pub fn check(&self, parsed: &Parsed, raw: &str) -> Result<(), Refusal> {
        if let Some(g) = self.deny_joined.iter().find(|g| glob(g, raw.trim())) {
            return Err(refuse(Reason::ProgramDenied, raw.trim(), format!("the command matches command_deny {g:?}")));
        }
        if parsed.pipeline && !self.pipelines {
            return Err(refuse(Reason::Pipeline, raw.trim(), "pipelines are not allowed here (pipelines: false)"));
        }
        if parsed.list && !self.lists {
            return Err(refuse(
                Reason::List,
                raw.trim(),
                "command lists (; && || newline) are not allowed here (lists: false)",
            ));
        }
        parsed.commands.iter().try_for_each(|c| self.check_one(c))
    }

    fn check_one(&self, cmd: &Simple) -> Result<(), Refusal> {
        let node = || cmd.text.clone();
        let program = cmd.program();
        if cmd.words[0].glob || program.is_empty() {
            return Err(refuse(Reason::ProgramNotLiteral, node(), "the program must be a literal name or path"));
        }
        let denied = |w: &str| self.deny.iter().find(|d| glob(d, base_name(w))).cloned();
        if let Some(d) = denied(program) {
            return Err(refuse(Reason::ProgramDenied, node(), format!("program {program:?} is denied ({d:?})")));
        }
        if let Some(g) = self.deny_joined.iter().find(|g| glob(g, &cmd.joined())) {
            return Err(refuse(Reason::ProgramDenied, node(), format!("the command matches command_deny {g:?}")));
        }
        if let Some((reason, why)) = classify(cmd) {
            let released =
                reason != Reason::Eval && self.allow.iter().any(|r| r.releases_wrapper(program) && r.matches(cmd));
            if !released {
                return Err(refuse(reason, node(), format!("{program:?}: {why}")));
            }
            // A released wrapper still may not name a denied program anywhere in its words.
            if let Some((w, d)) = cmd.words[1..].iter().find_map(|w| denied(&w.value).map(|d| (w, d))) {
                return Err(refuse(
                    Reason::ProgramDenied,
                    node(),
                    format!("{:?} is denied ({d:?}) and {program:?} would run it", w.value),
                ));
            }
        }
        if !self.globs && cmd.words[1..].iter().any(|w| w.glob) {
            return Err(refuse(
                Reason::Glob,
                node(),
                "unquoted globs are not allowed here (quote the word, or globs: true)",
            ));
        }
        if !self.redirections
            && let Some(r) = cmd.redirects.iter().find(|r| r.target.value != "/dev/null")
        {
            return Err(refuse(
                Reason::Redirection,
                node(),
                format!("redirection {} {} is not allowed here (redirections: true)", r.op, r.target.value),
            ));
        }
        if self.allow.is_empty() || self.allow.iter().any(|r| r.matches(cmd)) {
            return Ok(());
        }
        let named: Vec<&str> = self.allow.iter().filter(|r| r.names_program(program)).map(|r| r.text()).collect();
        if named.is_empty() {
            Err(refuse(Reason::ProgramNotAllowed, node(), format!("no allow rule names program {program:?}")))
        } else {
            Err(refuse(
                Reason::ArgumentsNotAllowed,
                node(),
                format!("the arguments match none of the rules for {program:?}: {}", named.join(" | ")),
            ))
        }
    }
}

#[cfg(test)]
mod tests;
