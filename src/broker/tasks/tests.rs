//! Task store invariants (DESIGN.md §4: 1–5 and 10), without a broker: an in-memory store, and
//! a journaled one reloaded from disk. Sealing is the identity here; the integration tests use
//! the real signer.

use super::*;
use crate::broker::auth::fingerprint;
use crate::broker::blocking::BlockingPool;

const T0: UnixMicros = UnixMicros(1_893_456_000_000_000);

fn new_task(agent: &str, expires_in_s: i64) -> NewTask {
    NewTask {
        agent: agent.into(),
        delegated_by: None,
        description: "t".into(),
        expires: UnixMicros::from_secs(T0.secs() + expires_in_s),
        can_delegate: true,
        delegation_depth: 5,
        narrowing: vec![],
        holder_key: None,
        bind_deadline: None,
    }
}

fn id(n: u8) -> Ulid {
    Ulid::from_parts(T0.0 as u64 / 1000, n as u128)
}

fn verify(s: &TaskStore, token: &str) -> Result<TokenIdentity, String> {
    s.verify_token(token, &fingerprint(token), UnixMicros(T0.0 + 1_000_000))
}

async fn root_async(s: &TaskStore, n: u8) -> String {
    let key = RootKey::from_bytes(&[n; 32]);
    s.create(id(n), new_task("alice", 3600), "agent:alice".into(), &key, vec![n; 32], T0).await.unwrap().1
}

async fn child_async(s: &TaskStore, parent_token: &str, n: u8, new: NewTask) -> Result<String, Error> {
    let p = verify(s, parent_token).unwrap();
    let parent = Ulid::from_string(&p.task).unwrap();
    s.delegate(parent, &p.verified.macaroon, id(n), new, T0).await.map(|r| r.1)
}

fn root(s: &TaskStore, n: u8) -> String {
    crate::broker::reactor::block_on(root_async(s, n))
}

fn child(s: &TaskStore, parent_token: &str, n: u8, new: NewTask) -> Result<String, Error> {
    crate::broker::reactor::block_on(child_async(s, parent_token, n, new))
}

#[test]
fn delegation_keeps_the_other_tokens_of_the_tree_working() {
    let s = TaskStore::new();
    let r = root(&s, 1);
    let a = child(&s, &r, 2, new_task("alice", 600)).unwrap();
    let b = child(&s, &r, 3, new_task("alice", 600)).unwrap();
    let aa = child(&s, &a, 4, new_task("alice", 300)).unwrap();
    for (t, task, depth) in [(&r, 1, 0), (&a, 2, 1), (&b, 3, 1), (&aa, 4, 2)] {
        let v = verify(&s, t).unwrap();
        assert_eq!(v.task, id(task).to_string());
        assert_eq!(v.depth, depth);
        assert_eq!(v.agent, "alice");
    }
    assert_eq!(verify(&s, &aa).unwrap().lineage, vec![id(1).to_string(), id(2).to_string(), id(4).to_string()]);
    // The minted token of a task, rebuilt from the root key, is exactly what was handed out.
    assert_eq!(s.minted_token(id(4)).unwrap().encode(), aa);
}

#[test]
fn revoking_kills_the_task_and_every_descendant_including_attenuated_copies() {
    let s = TaskStore::new();
    let r = root(&s, 1);
    let a = child(&s, &r, 2, new_task("alice", 600)).unwrap();
    let aa = child(&s, &a, 3, new_task("alice", 300)).unwrap();
    let b = child(&s, &r, 4, new_task("alice", 600)).unwrap();
    // The holder of `a` attenuates it offline before and after the revocation.
    let narrowed = attenuate(&Macaroon::decode(&a).unwrap(), "target IN [web]").encode();
    assert_eq!(crate::broker::reactor::block_on(s.revoke(id(2), T0)).unwrap(), 1, "one descendant goes with it");
    let later = attenuate(&Macaroon::decode(&a).unwrap(), "role IN [read]").encode();
    for t in [&a, &aa, &narrowed, &later] {
        let e = verify(&s, t).unwrap_err();
        assert!(e.contains(&format!("task {} was revoked", id(2))), "{e}");
    }
    verify(&s, &r).unwrap();
    verify(&s, &b).unwrap();
    // Delegating from a revoked task is refused too.
    let p = Macaroon::decode(&a).unwrap();
    assert!(matches!(
        crate::broker::reactor::block_on(s.delegate(id(2), &p, id(9), new_task("alice", 60), T0)),
        Err(Error::Refused(_))
    ));
    assert!(matches!(crate::broker::reactor::block_on(s.revoke(id(2), T0)), Err(Error::Refused(_))), "already revoked");
}

#[test]
fn appended_caveats_cannot_change_the_acting_task_or_skip_the_tree() {
    let s = TaskStore::new();
    let r = root(&s, 1);
    let a = child(&s, &r, 2, new_task("alice", 600)).unwrap();
    let b = child(&s, &r, 3, NewTask { narrowing: vec!["target IN [web]".into()], ..new_task("bob", 600) }).unwrap();
    assert_eq!(verify(&s, &b).unwrap().agent, "bob");
    // The holder of the root token claims to act as `b` (bob's, narrowed) by appending only its
    // task caveat: the chain is valid, but the binding digest covers all of `b`'s minted caveats.
    let forged = attenuate(&Macaroon::decode(&r).unwrap(), &format!("task = {}", id(3))).encode();
    assert!(verify(&s, &forged).unwrap_err().contains("was not minted by this broker"));
    // Nor can `a`'s holder graft the sibling below it.
    let forged = attenuate(&Macaroon::decode(&a).unwrap(), &format!("task = {}", id(3))).encode();
    assert!(verify(&s, &forged).is_err());
    // Tampering breaks the chain.
    let mut m = Macaroon::decode(&a).unwrap().to_binary().to_vec();
    let n = m.len();
    m[n - 1] ^= 1;
    let tampered = format!("mac_{}", BASE64URL_NOPAD.encode(&m));
    assert!(verify(&s, &tampered).unwrap_err().contains("signature"));
}

#[test]
fn a_child_never_outlives_its_parent_and_expiry_is_enforced() {
    let s = TaskStore::new();
    let r = root(&s, 1);
    let e = child(&s, &r, 2, new_task("alice", 7200)).unwrap_err();
    assert!(e.to_string().contains("outlive"), "{e}");
    let a = child(&s, &r, 3, new_task("alice", 60)).unwrap();
    let after = UnixMicros(T0.0 + 61_000_000);
    assert!(s.verify_token(&a, &fingerprint(&a), after).unwrap_err().contains("expired"));
    s.verify_token(&r, &fingerprint(&r), after).unwrap();
    assert_eq!(s.collect(after), 1);
    assert_eq!(s.len(), 1);
    assert_eq!(s.collect(UnixMicros(T0.0 + 3_601_000_000)), 1);
    assert_eq!(s.trees(), 0, "the tree's key goes with its root");
}

#[test]
fn tokens_of_another_broker_are_unknown_here() {
    let ours = TaskStore::new();
    let theirs = TaskStore::new();
    let _ = root(&ours, 1);
    let t = root(&theirs, 2);
    assert!(verify(&ours, &t).unwrap_err().contains("no task tree"));
    // Same tree id, different key: the signature fails.
    let other = TaskStore::new();
    let key = RootKey::from_bytes(&[0xee; 32]);
    let forged =
        crate::broker::reactor::block_on(other.create(id(1), new_task("alice", 3600), "x".into(), &key, vec![], T0))
            .unwrap()
            .1;
    assert!(verify(&ours, &forged).unwrap_err().contains("signature"));
}

#[test]
fn holder_bindings_are_inherited_and_only_the_broker_rebinds() {
    let s = TaskStore::new();
    let r = root(&s, 1);
    let k1 = [1u8; 32];
    let k2 = [2u8; 32];
    assert_eq!(verify(&s, &r).unwrap().holder, Holder::Bearer);
    crate::broker::reactor::block_on(s.bind(id(1), k1, T0)).unwrap();
    crate::broker::reactor::block_on(s.bind(id(1), k1, T0)).unwrap(); // idempotent
    assert!(crate::broker::reactor::block_on(s.bind(id(1), k2, T0)).unwrap_err().to_string().contains("already bound"));
    let a = child(&s, &r, 2, new_task("alice", 600)).unwrap();
    assert_eq!(verify(&s, &a).unwrap().holder, Holder::Key(k1), "inherited");
    let stolen = attenuate(&Macaroon::decode(&a).unwrap(), "target IN [web]").encode();
    assert_eq!(verify(&s, &stolen).unwrap().holder, Holder::Key(k1), "attenuation does not shed it");
    assert!(crate::broker::reactor::block_on(s.bind(id(2), k2, T0)).unwrap_err().to_string().contains("inherited"));
    let b = child(&s, &r, 3, NewTask { holder_key: Some(k2), ..new_task("bob", 600) }).unwrap();
    assert_eq!(verify(&s, &b).unwrap().holder, Holder::Key(k2), "re-bound by the broker at delegation");
    let c = child(&s, &b, 4, NewTask { bind_deadline: Some(UnixMicros(T0.0 + 30_000_000)), ..new_task("bob", 300) })
        .unwrap();
    assert_eq!(verify(&s, &c).unwrap().holder, Holder::Key(k2), "a bound ancestor wins over a deadline");
    assert_eq!(verify(&s, &b).unwrap().delegators, vec!["alice".to_string()]);
}

#[test]
fn journaled_state_survives_a_reload_and_a_torn_tail() {
    let dir = std::env::temp_dir().join(format!("ephyr-tasks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tasks.journal");
    let _ = std::fs::remove_file(&path);
    let pool = BlockingPool::new(1, 8);
    let unseal = |_ctx: String, sealed: Vec<u8>| async move { Ok(RootKey::from_bytes(&sealed)) };
    let ex = Rc::new(smol::LocalExecutor::new());
    let logs = journal::Files::new(dir.clone(), pool, ex.clone());
    assert_eq!(logs.path(LOG), path);
    let (r, a, b) = crate::broker::reactor::block_on(ex.run(async {
        let (s, loaded) = TaskStore::load(&logs, T0, unseal).await.unwrap();
        assert_eq!(loaded.tasks, 0);
        let r = root_async(&s, 1).await;
        let a = child_async(&s, &r, 2, new_task("alice", 600)).await.unwrap();
        let b = child_async(&s, &r, 3, new_task("alice", 600)).await.unwrap();
        s.revoke(id(2), T0).await.unwrap();
        s.bind(id(3), [7; 32], T0).await.unwrap();
        (r, a, b)
    }));
    // A crash mid-write leaves half a record at the end.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&journal::frame(b"{\"t\":\"revoke\"")[..9]).unwrap();
    }
    let (s, loaded) = crate::broker::reactor::block_on(TaskStore::load(&logs, T0, unseal)).unwrap();
    assert_eq!((loaded.tasks, loaded.trees), (3, 1));
    assert!(loaded.torn_bytes > 0);
    verify(&s, &r).unwrap();
    assert!(verify(&s, &a).unwrap_err().contains("revoked"), "the revocation survived");
    assert_eq!(verify(&s, &b).unwrap().holder, Holder::Key([7; 32]), "the binding survived");
    // The compacted journal loads to the same state, and expired state is dropped on load.
    let (s2, _) = crate::broker::reactor::block_on(TaskStore::load(&logs, T0, unseal)).unwrap();
    assert!(verify(&s2, &a).is_err());
    let (s3, l3) =
        crate::broker::reactor::block_on(TaskStore::load(&logs, UnixMicros(T0.0 + 4_000_000_000), unseal)).unwrap();
    assert_eq!((l3.tasks, l3.trees, s3.len()), (0, 0, 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unsealable_tree_is_dropped_with_its_tasks() {
    let dir = std::env::temp_dir().join(format!("ephyr-tasks-unseal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tasks.journal");
    let _ = std::fs::remove_file(&path);
    let pool = BlockingPool::new(1, 8);
    let ok = |_c: String, sealed: Vec<u8>| async move { Ok(RootKey::from_bytes(&sealed)) };
    let ex = Rc::new(smol::LocalExecutor::new());
    let logs = journal::Files::new(dir.clone(), pool, ex.clone());
    crate::broker::reactor::block_on(ex.run(async {
        let (s, _) = TaskStore::load(&logs, T0, ok).await.unwrap();
        root_async(&s, 1).await;
    }));
    let refuse =
        |_c: String, _s: Vec<u8>| async move { Err::<RootKey, _>("unseal_failed: wrong sealing key".to_string()) };
    let (s, loaded) = crate::broker::reactor::block_on(TaskStore::load(&logs, T0, refuse)).unwrap();
    assert_eq!(loaded.unsealable.len(), 1);
    assert!(loaded.unsealable[0].contains("wrong sealing key"));
    assert!(s.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Task events: a holder waiting on a grandchild learns of the root's revocation at once, and a
/// token's own expiry ends the wait when it passes; nothing polls.
#[test]
fn waiters_are_woken_by_a_revocation_above_them_and_by_expiry() {
    let s = TaskStore::new();
    let r = root(&s, 1);
    let a = child(&s, &r, 2, new_task("alice", 600)).unwrap();
    let _aa = child(&s, &a, 3, new_task("alice", 300)).unwrap();
    let grandchild = id(3).to_string();
    let cursor = s.events.cursor();
    let woke = std::cell::Cell::new(None);
    let ex = smol::LocalExecutor::new();
    crate::broker::reactor::block_on(ex.run(async {
        let waiter = ex.spawn(async {
            s.until_unusable(&grandchild, None).await;
            woke.set(Some(std::time::Instant::now()));
        });
        futures_lite::future::yield_now().await;
        assert!(woke.get().is_none(), "the task lives");
        let t = std::time::Instant::now();
        s.revoke(id(1), T0).await.unwrap();
        waiter.await;
        assert!(woke.get().unwrap().duration_since(t) < std::time::Duration::from_millis(100));
    }));
    let (events, _) = s.events.since(cursor).unwrap();
    assert_eq!(events, vec![events::TaskEvent::Revoked { task: id(1), descendants: 2 }]);
    // A live task with a token that expires in 150 ms.
    let s = TaskStore::new();
    root(&s, 9);
    let exp = UnixMicros(crate::time::now().0 + 150_000);
    let t = std::time::Instant::now();
    crate::broker::reactor::block_on(s.until_unusable(&id(9).to_string(), Some(exp)));
    let waited = t.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(140) && waited < std::time::Duration::from_secs(2),
        "{waited:?}"
    );
}

/// The spans of forgotten proof nonces outlive a compaction and a restart: a journal compacted
/// after the nonces were pruned still refuses their windows (a clock that goes back across a
/// restart reopens none of them).
#[test]
fn forgotten_nonce_spans_survive_compaction() {
    let mut st = State::default();
    st.replay.restore([1; 16], T0);
    st.replay.restore([2; 16], UnixMicros(T0.0 + 7_200_000_000));
    st.collect(UnixMicros(T0.0 + 7_300_000_000));
    assert!(st.replay.is_empty());
    let mut back = State::default();
    let mut trees = Vec::new();
    for r in st.snapshot() {
        back.apply(serde_json::from_slice(&r).unwrap(), &mut trees).unwrap();
    }
    assert_eq!(back.replay.forgotten().len(), 2, "two spans, two hours apart");
    assert_eq!(back.replay.forgotten(), st.replay.forgotten());
}

/// The revocation cascade as a property: any forest grown by creating roots, delegating from any
/// task and revoking any task, compared after every step with a model (who is whose parent, who was
/// revoked). A token works exactly when no task on its path from the root is revoked, and a
/// refusal names the first revoked one from the root; delegating below a revoked task is refused;
/// a revocation reports every task below it; and the journal reloads to the same answers.
mod revocation_cascade {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    #[derive(Clone, Debug)]
    enum Op {
        Root,
        Delegate(Index),
        Revoke(Index),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Root),
            5 => any::<Index>().prop_map(Op::Delegate),
            2 => any::<Index>().prop_map(Op::Revoke),
        ]
    }

    /// Task `i` is `id(i + 1)`; `parent[i]` its parent's index; `revoked[i]` set by a revocation
    /// of `i` itself, never by the cascade (the store keeps one watermark per revoked task too).
    #[derive(Default)]
    struct Model {
        parent: Vec<Option<usize>>,
        revoked: Vec<bool>,
        tokens: Vec<String>,
    }

    impl Model {
        fn path(&self, i: usize) -> Vec<usize> {
            let mut p = vec![i];
            while let Some(up) = self.parent[*p.last().unwrap()] {
                p.push(up);
            }
            p.reverse();
            p
        }
        fn first_revoked(&self, i: usize) -> Option<usize> {
            self.path(i).into_iter().find(|&x| self.revoked[x])
        }
        fn below(&self, i: usize) -> usize {
            (0..self.parent.len()).filter(|&x| x != i && self.path(x).contains(&i)).count()
        }
    }

    fn check(s: &TaskStore, m: &Model) -> Result<(), TestCaseError> {
        for (i, token) in m.tokens.iter().enumerate() {
            match (verify(s, token), m.first_revoked(i)) {
                (Ok(v), None) => prop_assert_eq!(v.task, id(i as u8 + 1).to_string()),
                (Err(e), Some(r)) => {
                    let want = format!("task {} was revoked", id(r as u8 + 1));
                    prop_assert!(e.contains(&want), "task {}: {} (want {})", i, e, want);
                }
                (got, want) => prop_assert!(false, "task {}: {:?}, model says revoked at {:?}", i, got, want),
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn a_revocation_takes_exactly_the_subtree_and_survives_a_reload(ops in proptest::collection::vec(op(), 1..48)) {
            static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("ephyr-cascade-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let unseal = |_ctx: String, sealed: Vec<u8>| async move { Ok(RootKey::from_bytes(&sealed)) };
            let ex = Rc::new(smol::LocalExecutor::new());
            let logs = journal::Files::new(dir.clone(), BlockingPool::new(1, 8), ex.clone());
            let mut m = Model::default();
            crate::broker::reactor::block_on(ex.run(async {
                let (s, _) = TaskStore::load(&logs, T0, unseal).await.unwrap();
                for op in &ops {
                    let next = m.tokens.len() as u8 + 1;
                    match op {
                        Op::Root => {
                            m.tokens.push(root_async(&s, next).await);
                            m.parent.push(None);
                            m.revoked.push(false);
                        }
                        Op::Delegate(_) | Op::Revoke(_) if m.tokens.is_empty() => continue,
                        Op::Delegate(at) => {
                            // Depth stays under the tokens' delegation_depth caveat (5).
                            let fit: Vec<usize> = (0..m.tokens.len()).filter(|&i| m.path(i).len() < 5).collect();
                            let p = fit[at.index(fit.len())];
                            let parent = id(p as u8 + 1);
                            let token = Macaroon::decode(&m.tokens[p]).unwrap();
                            let got = s.delegate(parent, &token, id(next), new_task("alice", 600), T0).await;
                            match (got, m.first_revoked(p)) {
                                (Ok((_, t)), None) => {
                                    m.tokens.push(t);
                                    m.parent.push(Some(p));
                                    m.revoked.push(false);
                                }
                                (Err(Error::Refused(e)), Some(_)) => prop_assert!(e.contains("is revoked"), "{}", e),
                                (got, r) => prop_assert!(false, "delegating from {}: {:?}, revoked at {:?}", p, got.map(|x| x.1), r),
                            }
                        }
                        Op::Revoke(at) => {
                            let i = at.index(m.tokens.len());
                            let got = s.revoke(id(i as u8 + 1), T0).await;
                            if m.revoked[i] {
                                prop_assert!(matches!(got, Err(Error::Refused(_))), "revoked twice: {:?}", got);
                            } else {
                                prop_assert_eq!(got.unwrap(), m.below(i), "the cascade count of {}", i);
                                m.revoked[i] = true;
                            }
                        }
                    }
                    check(&s, &m)?;
                }
                Ok(())
            }))?;
            let (s, loaded) = crate::broker::reactor::block_on(TaskStore::load(&logs, T0, unseal)).unwrap();
            prop_assert_eq!(loaded.tasks, m.tokens.len());
            check(&s, &m)?;
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
