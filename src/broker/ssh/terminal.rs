//! Terminal sessions (`session_create` with `mode: pty`): the broker side of interactive
//! programs.
//!
//! What runs here: on the executor thread, the gate ([`allowed`]) and `session_input`: each
//! call is authorized against the session's own target and role under the caller's current
//! token, gated again (a reload may have added a command policy), audited before the keystrokes
//! are sent (`ssh_input`, fails closed), and recorded (asciicast with an `i` event for the
//! keystrokes, secrets masked). The wire side is `pty`.
//!
//! Keystrokes are not commands: nothing can tell what a shell will make of them before they are
//! typed. So a terminal is refused wherever commands are judged — a command policy on the target
//! or the role, `verify_on_target`, an approval rule with command patterns — and where the
//! target's certificates do not carry `permit-pty`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::pty::{MAX_SIZE, MIN_SIZE};
use super::{Asker, Ran, Session, Ssh, audit_command, now_secs, recording, ssh_err, with_task};
use crate::broker::Error;
use crate::broker::audit::{Event, Kind};
use crate::broker::policy::{Action, ActionKind, Decision, Policy};

/// Longest keystroke text per call.
pub const MAX_INPUT: usize = 64 * 1024;
/// Longest wait for output per call, in milliseconds.
pub const MAX_WAIT_MS: u64 = 30_000;

/// Whether `agent` may have a `cols`×`rows` terminal as `role` on `target`; `Err` says why not.
pub fn allowed(policy: &Policy, agent: &str, target: &str, role: &str, (cols, rows): (u32, u32)) -> Result<(), Error> {
    for (n, what) in [(cols, "cols"), (rows, "rows")] {
        if !(MIN_SIZE..=MAX_SIZE).contains(&n) {
            return Err(Error::Invalid(format!("argument {what:?} is {n}; a terminal is {MIN_SIZE} to {MAX_SIZE}")));
        }
    }
    let Some(t) = policy.targets.get(target) else { return Err(Error::Refused(format!("no target {target:?}"))) };
    let refuse =
        |why: String| Err(Error::Refused(format!("no terminal (mode pty) on target {target:?} as {role:?}: {why}")));
    if !t.extensions.iter().any(|e| e == "permit-pty") {
        return refuse("its certificates do not carry permit-pty (targets.<name>.extensions)".into());
    }
    if t.verify_on_target.is_some() {
        return refuse("the target verifies every command itself (verify_on_target)".into());
    }
    if t.commands.is_some() {
        return refuse("the target has a command policy, and keystrokes cannot be checked by it".into());
    }
    if policy.roles.get(role).is_some_and(|r| r.commands.is_some()) {
        return refuse("the role has a command policy, and keystrokes cannot be checked by it".into());
    }
    let rules = crate::broker::policy::approval::command_rules(policy, agent, target, role);
    if !rules.is_empty() {
        return refuse(format!(
            "approval rules hold commands here by their text ({}), and keystrokes cannot be matched against it",
            rules.join(", ")
        ));
    }
    Ok(())
}

impl Ssh {
    /// Sends keystrokes to terminal session `id` (after resizing it to `size`, if given) and
    /// returns what it printed within `wait` (see `Pty::send`).
    pub async fn session_input(
        &self,
        asker: Asker<'_>,
        id: &str,
        input: &str,
        size: Option<(u32, u32)>,
        wait: Duration,
    ) -> Result<Ran, Error> {
        let Asker { ports, caller, policy, arguments } = asker;
        let s = self.session_for(policy, caller, id)?;
        let Some(pty) = s.pty.clone() else {
            return Err(Error::Refused(format!(
                "session {id:?} is not a terminal: run commands on it with exec (session_input is for mode pty)"
            )));
        };
        if input.len() > MAX_INPUT {
            return Err(Error::Invalid(format!(
                "argument \"input\" is {} bytes; the limit is {MAX_INPUT}",
                input.len()
            )));
        }
        let (target, role) = (s.target.as_str(), s.role.as_str());
        let action = Action { tool: Some("session_input"), kind: ActionKind::Ssh { target, role }, arguments };
        let principal = match crate::broker::policy::authorize(policy, &caller.principal(), &action) {
            Decision::Allow(g) => g.principal.unwrap_or_default().to_owned(),
            Decision::Deny(d) => return Err(Error::Denied(d)),
        };
        let size_now = size.unwrap_or(s.size.get());
        if let Err(e) = allowed(policy, &caller.agent, target, role, size_now) {
            if !matches!(e, Error::Invalid(_)) {
                self.close(ports, &s, "the policy no longer allows a terminal here").await;
            }
            return Err(e);
        }
        if principal != s.principal {
            self.close(ports, &s, "role principal changed").await;
            return Err(Error::Refused(format!(
                "session {id:?} was closed: role {role:?} now maps to another principal; open a new session"
            )));
        }
        if pty.is_closed() || s.conn.borrow().is_closed() || s.cert_until.get() <= now_secs() {
            self.close(ports, &s, "the terminal's shell ended").await;
            return Err(Error::Refused(format!(
                "terminal session {id:?} has ended (its shell exited, or its certificate expired); open a new session"
            )));
        }
        s.within_max(self, ports, policy, &s).await?;
        if size_now != s.size.get() {
            pty.resize(size_now.0, size_now.1).await.map_err(ssh_err)?;
            s.size.set(size_now);
        }
        let started = now_secs();
        let ev = with_task(Event::new(Kind::Ssh, "ssh_input"), caller).agent(caller.agent.clone()).action(json!({
            "target": target, "role": role, "session": id, "input": audit_command(input), "bytes": input.len(),
        }));
        let ticket = ports.audit.record(ev.allow()).map_err(|e| Error::audit(e.to_string()))?;
        s.last_used.set(Instant::now());
        s.commands.set(s.commands.get() + 1);
        let (r, d) = futures_lite::future::zip(
            pty.send(input.as_bytes().to_vec(), wait, policy.limits.output_max),
            ticket.durable(),
        )
        .await;
        s.last_used.set(Instant::now());
        d.map_err(|e| Error::audit(format!("{e} (the keystrokes were sent; their record may be incomplete)")))?;
        let result = r.map_err(ssh_err)?;
        let recording = self.record_terminal(asker, &s, (started, input), &result).await;
        let notice = if pty.is_closed() {
            self.close(ports, &s, "the terminal's shell ended").await;
            Some("the terminal's shell ended (exit_code has its status): the session is closed".to_owned())
        } else {
            None
        };
        Ok(Ran { result, serial: s.serial(), host_key_warning: None, connect: Duration::ZERO, recording, notice })
    }

    async fn record_terminal(
        &self,
        asker: Asker<'_>,
        s: &Rc<Session>,
        (started, input): (u64, &str),
        r: &super::client::ExecResult,
    ) -> Option<String> {
        let about = recording::About {
            started,
            agent: &asker.caller.agent,
            target: &s.target,
            role: &s.role,
            command: input,
            session: Some(&s.id),
            terminal: Some((s.size.get(), input.as_bytes())),
        };
        self.record(asker.ports, asker.caller, asker.policy, about, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminals_are_refused_where_commands_are_judged() {
        let p = Policy::parse(
            "roles: {r: {principal: p}, n: {principal: p, commands: {allow: [uptime]}}}\n\
             targets:\n  open: {host: h1, allowed_roles: [r, n]}\n  cmds: {host: h2, allowed_roles: [r], commands: {allow: [uptime]}}\n  \
             nopty: {host: h3, allowed_roles: [r], extensions: []}\n  held: {host: h4, allowed_roles: [r]}\n\
             approvals: {rules: {restarts: {ssh: {targets: [held], commands: ['systemctl restart *']}}}}\n",
            "t",
        )
        .unwrap();
        allowed(&p, "a", "open", "r", (80, 24)).unwrap();
        let why = |t: &str, r: &str| match allowed(&p, "a", t, r, (80, 24)) {
            Err(Error::Refused(m)) => m,
            other => panic!("{t}/{r}: {other:?}"),
        };
        assert!(why("open", "n").contains("the role has a command policy"));
        assert!(why("cmds", "r").contains("the target has a command policy"));
        assert!(why("nopty", "r").contains("permit-pty"));
        assert!(why("held", "r").contains("approval rules hold commands here by their text (restarts)"));
        assert!(
            matches!(allowed(&p, "a", "open", "r", (5, 24)), Err(Error::Invalid(m)) if m.contains("\"cols\" is 5"))
        );
        assert!(matches!(allowed(&p, "a", "open", "r", (80, 5000)), Err(Error::Invalid(_))));
    }
}
