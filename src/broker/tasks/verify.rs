//! Task token verification: the chain under its tree's root key, the reduction (memoised), then
//! on every use the validity window and each task of the lineage against the store.

use super::*;

impl TaskStore {
    /// Verifies a `mac_…` token at `now`: decoded strictly, the chain checked under its tree's
    /// root key and reduced (memoised by `fingerprint`, the SHA-256 of the text), then — on
    /// every use — its validity window, and each task of its lineage: minted here with exactly
    /// this prefix, the previous one's child, live, and under no revocation watermark.
    pub fn verify_token(&self, token: &str, fingerprint: &[u8; 32], now: UnixMicros) -> Result<TokenIdentity, String> {
        let mut st = self.state.borrow_mut();
        let verified = match st.memo.get(fingerprint) {
            Some(v) => v.clone(),
            None => {
                let m = Macaroon::decode(token).map_err(|e| format!("not a task token: {e}"))?;
                let root = std::str::from_utf8(m.identifier())
                    .ok()
                    .and_then(|s| Ulid::from_string(s).ok())
                    .ok_or("the token's identifier is not a task id")?;
                let tree = st.trees.get(&root).ok_or_else(|| {
                    format!("no task tree {root} on this broker (expired, revoked, or issued by another broker)")
                })?;
                let reduced = tree.start.verify_and_reduce(&m).map_err(|e| e.to_string())?;
                let v = Rc::new(Verified { macaroon: m, reduced });
                if st.memo.len() >= MEMO_CAPACITY {
                    st.memo.clear();
                }
                st.memo.insert(*fingerprint, v.clone());
                v
            }
        };
        drop(st);
        verified.reduced.envelope.check_time(now).map_err(|e| e.to_string())?;
        let st = self.state.borrow();
        let lineage = &verified.reduced.lineage;
        let mut parent: Option<Ulid> = None;
        let mut delegators: Vec<String> = Vec::new();
        let mut last: Option<&Task> = None;
        // The nearest holder key on the lineage (the lineage is the chain from the root).
        let mut key: Option<[u8; 32]> = None;
        for entry in lineage {
            let t = st
                .tasks
                .get(&entry.task)
                .filter(|t| t.expires > now.0)
                .ok_or_else(|| format!("task {} no longer exists (expired or removed)", entry.task))?;
            if !crate::secret::constant_time_eq(&t.binding, &entry.binding) {
                return Err(format!("the token's caveat for task {} was not minted by this broker", entry.task));
            }
            if t.parent != parent {
                return Err(format!("task {} is not a child of the token's previous task", entry.task));
            }
            if let Some(at) = t.revoked_at {
                return Err(format!("task {} was revoked at {}", t.id, UnixMicros(at).to_rfc3339()));
            }
            if let Some(prev) = last
                && prev.agent != t.agent
                && !delegators.contains(&prev.agent)
            {
                delegators.push(prev.agent.clone());
            }
            key = t.holder_key.or(key);
            parent = Some(t.id);
            last = Some(t);
        }
        let t = last.ok_or("the token names no task")?;
        let root = lineage.first().map(|l| l.task).unwrap_or(t.id);
        Ok(TokenIdentity {
            agent: t.agent.clone(),
            task: t.id.to_string(),
            root: root.to_string(),
            lineage: lineage.iter().map(|l| l.task.to_string()).collect(),
            initiated_by: t.initiated_by.clone(),
            delegators,
            depth: t.depth,
            holder: holder(key, t.bind_deadline),
            verified,
        })
    }
}
