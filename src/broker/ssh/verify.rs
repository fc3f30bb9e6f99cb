//! `ephyr target verify NAME`: does a target work for every role it allows? For each role the
//! broker issues a fresh one-minute certificate (audited like any other, as the operator who
//! asked), connects with the target's host-key check, runs `id -un` and looks at the revocation
//! list the setup script installs, and reports per role: logged in as the role's principal, how
//! the host key was checked, and how old the KRL on the host is.
//!
//! What runs here: the executor thread (issuance, audit, registry) and the SSH runtime (the
//! connections), one role after the other.

use std::time::Duration;

use serde_json::{Value, json};

use super::{ExecLimits, Ssh, now_secs, setup::KRL_FILE};
use crate::broker::Error;
use crate::broker::auth::{Caller, Via};
use crate::broker::policy::Policy;
use crate::broker::ports::Ports;

/// A KRL older than this on a host that fetches it every minute is stale.
const KRL_STALE_SECS: u64 = 5 * 60;

/// What was found for one role.
#[derive(Debug)]
pub struct RoleReport {
    /// The role.
    pub role: String,
    /// Its principal (the remote user).
    pub principal: String,
    /// Logged in as the principal, host key accepted.
    pub ok: bool,
    /// What went wrong (empty when `ok`).
    pub problems: Vec<String>,
    /// What is worth fixing but does not stop the role working.
    pub warnings: Vec<String>,
    /// The remote user `id -un` printed.
    pub logged_in_as: Option<String>,
    /// How the host key was checked, and what the host presented.
    pub host_key: String,
    /// Seconds since the host's KRL file changed (`None`: no KRL there).
    pub krl_age_secs: Option<u64>,
}

impl RoleReport {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "role": self.role, "principal": self.principal, "ok": self.ok, "problems": self.problems,
            "warnings": self.warnings, "logged_in_as": self.logged_in_as, "host_key": self.host_key,
            "krl_age_secs": self.krl_age_secs,
        })
    }
}

impl Ssh {
    /// Verifies every role of `target` (see the module header). `actor` names the operator in
    /// key ids and audit records.
    pub async fn verify_target(
        &self,
        ports: Ports<'_>,
        policy: &Policy,
        actor: &str,
        target: &str,
    ) -> Result<Vec<RoleReport>, Error> {
        let t =
            policy.targets.get(target).ok_or_else(|| Error::NotFound(format!("no target {target:?} in the policy")))?;
        // The operator acts as itself: no agent's grants, no task.
        let caller = Caller { agent: actor.to_owned(), via: Via::ApiKey, fingerprint: [0; 32], source: None };
        let mut out = Vec::new();
        for role in &t.allowed_roles {
            let principal = policy.roles.get(role).map(|r| r.principal.clone()).unwrap_or_default();
            let mut r = RoleReport {
                role: role.clone(),
                principal: principal.clone(),
                ok: false,
                problems: Vec::new(),
                warnings: Vec::new(),
                logged_in_as: None,
                host_key: String::new(),
                krl_age_secs: None,
            };
            let check = self.host_check(target, t, policy.limits.host_key_strict);
            r.host_key = match &check {
                Ok(c) => c.expected(),
                Err(e) => e.message(),
            };
            let connected =
                self.connect(ports, &caller, policy, target, role, &principal, None, Duration::from_secs(60)).await;
            match connected {
                Err(e) => r.problems.push(format!("{} ({}){}", e.message(), e.code(), hint(e.code()))),
                Ok((conn, _issued, held, warning)) => {
                    r.host_key = format!("{}; the host presented {}", r.host_key, conn.host_key);
                    if let Some(w) = warning {
                        r.warnings.push(w);
                    }
                    let cmd = format!("id -un; stat -c %Y {KRL_FILE} 2>/dev/null || echo none");
                    let limits = ExecLimits { max_stdout: 4096, max_stderr: 4096, timeout: Duration::from_secs(10) };
                    if t.verify_on_target.is_some() {
                        // The host must refuse a command without an envelope: that is the check.
                        match conn.exec(cmd, limits).await {
                            Err(e) => r.problems.push(format!("running a probe failed: {e}")),
                            Ok(res) if res.exit_status == Some(crate::shim::REFUSED as u32)
                                && String::from_utf8_lossy(&res.stderr).contains("ephyr shim:") =>
                            {
                                r.logged_in_as = Some(principal.clone());
                                r.warnings.push(
                                    "commands are verified on the host: a command without a signed envelope was refused by ephyr shim (the KRL age is not checked)".into(),
                                );
                            }
                            Ok(res) => r.problems.push(format!(
                                "the host ran a command without a signed envelope (exit {:?}): its forced command is not ephyr shim; run the setup script for this target (EPHYR_BIN=...)",
                                res.exit_status
                            )),
                        }
                        conn.close().await;
                        drop(held);
                        r.ok = r.problems.is_empty();
                        out.push(r);
                        continue;
                    }
                    match conn.exec(cmd, limits).await {
                        Err(e) => r.problems.push(format!("running `id -un` failed: {e}")),
                        Ok(res) => {
                            let text = String::from_utf8_lossy(&res.stdout).into_owned();
                            let mut lines = text.lines();
                            let user = lines.next().unwrap_or("").trim().to_owned();
                            if user != principal {
                                r.problems.push(format!(
                                    "logged in as {user:?}, not the role's principal {principal:?}: the host maps the principal to another account"
                                ));
                            }
                            r.logged_in_as = Some(user);
                            match lines.next().map(str::trim).and_then(|l| l.parse::<u64>().ok()) {
                                Some(mtime) => {
                                    let age = now_secs().saturating_sub(mtime);
                                    r.krl_age_secs = Some(age);
                                    if age > KRL_STALE_SECS {
                                        r.warnings.push(format!(
                                            "{KRL_FILE} was last changed {age}s ago: if the host fetches the broker's KRL (setup script with --broker-url), the timer is not running"
                                        ));
                                    }
                                }
                                None => r.warnings.push(format!(
                                    "no {KRL_FILE} on the host: revocations do not reach it (run `ephyr target setup-script --broker-url ...` there)"
                                )),
                            }
                        }
                    }
                    conn.close().await;
                    drop(held);
                }
            }
            r.ok = r.problems.is_empty();
            out.push(r);
        }
        Ok(out)
    }
}

fn hint(code: &str) -> &'static str {
    match code {
        "auth_refused" => {
            ": the host does not accept the broker's certificate for this user (is the CA line in TrustedUserCAKeys, does the user exist, does its principals file list the principal?)"
        }
        "host_key_mismatch" => {
            ": the host's key is not the pinned one (re-pin with `ephyr target scan`, after checking why)"
        }
        "host_unreachable" | "connect_timeout" => ": check the address, port and firewall",
        _ => "",
    }
}
