use super::*;

use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::signer::protocol::checkpoint_message;

struct TestSigner(Ed25519KeyPair);

impl TestSigner {
    fn new() -> TestSigner {
        TestSigner(Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).unwrap())
    }
    fn public(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }
}

impl CheckpointSigner for TestSigner {
    fn sign<'a>(&'a self, digest: [u8; 32]) -> Signed<'a> {
        Box::pin(async move { Ok((self.0.sign(&checkpoint_message(&digest)).as_ref().to_vec(), self.public())) })
    }
}

/// A scratch directory, removed when the test ends (passing or not).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("ephyr-audit-{tag}-{}", crate::ids::new_ulid(crate::time::now())));
    fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn with_log<T>(dir: &Path, config: AuditConfig, f: impl AsyncFnOnce(Rc<AuditLog>) -> T) -> T {
    let ex = smol::LocalExecutor::new();
    let pool = BlockingPool::new(1, 16);
    let log = AuditLog::open(dir, pool, config, Rc::new(Metrics::default())).unwrap();
    crate::broker::reactor::block_on(ex.run(async {
        ex.spawn(log.clone().run_flusher()).detach();
        f(log).await
    }))
}

fn event(i: usize) -> Event {
    Event::new(Kind::Decision, "authorize")
        .agent("claude")
        .task("01ARZ3NDEKTSV4RRFFQ69G5FAV", vec!["01ARZ3NDEKTSV4RRFFQ69G5FAV".into()])
        .action(serde_json::json!({"ssh": {"target": format!("web-{i}"), "role": "read"}}))
        .allow()
}

/// Writes `n` events, with a checkpoint after every 5 and a final one.
fn write_log(dir: &Path, n: usize, config: AuditConfig) -> Vec<u8> {
    let signer = TestSigner::new();
    with_log(dir, config, async |log: Rc<AuditLog>| {
        for i in 0..n {
            log.record(event(i)).unwrap().durable().await.unwrap();
            if i % 5 == 4 {
                log.checkpoint(&signer, false).await.unwrap();
            }
        }
        log.checkpoint(&signer, true).await.unwrap();
    });
    signer.public()
}

fn read_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    log_files(dir)
        .unwrap()
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect()
}

fn lines(dir: &Path) -> Vec<Vec<u8>> {
    fs::read(dir.join(ACTIVE)).unwrap().split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

fn write_lines(dir: &Path, ls: &[Vec<u8>]) {
    fs::write(dir.join(ACTIVE), ls.concat()).unwrap();
}

fn check(dir: &Path, key: &[u8]) -> verify::Report {
    let witnesses: Vec<_> = read_head(dir).into_iter().collect();
    verify::verify(&read_files(dir), Some(key), &witnesses)
}

fn errors(r: &verify::Report) -> String {
    r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

#[test]
fn an_untouched_log_verifies_and_ends_cleanly() {
    let dir = tempdir("clean");
    let key = write_log(&dir, 12, AuditConfig::default());
    let r = check(&dir, &key);
    assert!(r.ok(), "{}", errors(&r));
    assert_eq!(r.lines, 12 + 2 + 1, "12 events, 2 checkpoints, 1 final");
    assert_eq!(r.checkpoints, 3);
    assert!(r.ends_cleanly && r.warnings.is_empty(), "{:?}", r.warnings);
    // Without the trusted key nothing can be vouched for.
    assert!(!verify::verify(&read_files(&dir), None, &[]).ok());
    // With the wrong key every checkpoint fails.
    let wrong = Ed25519KeyPair::from_seed_unchecked(&[8u8; 32]).unwrap();
    let r = verify::verify(&read_files(&dir), Some(wrong.public_key().as_ref()), &[]);
    assert_eq!(r.errors.len(), 4, "{}", errors(&r));
    assert!(errors(&r).contains("no valid checkpoint in 15 line(s)"), "{}", errors(&r));
}

#[test]
fn each_kind_of_tampering_is_detected_and_located() {
    let dir = tempdir("tamper");
    let key = write_log(&dir, 12, AuditConfig::default());
    let orig = lines(&dir);

    // Edit a field.
    let mut edited = orig.clone();
    edited[3] = String::from_utf8(edited[3].clone()).unwrap().replace("claude", "mallory").into_bytes();
    write_lines(&dir, &edited);
    let r = check(&dir, &key);
    assert!(
        errors(&r).contains("audit.jsonl:5: prev does not match the hash of the line before (seq 4)"),
        "{}",
        errors(&r)
    );

    // Delete a line.
    let mut deleted = orig.clone();
    deleted.remove(7);
    write_lines(&dir, &deleted);
    let r = check(&dir, &key);
    assert!(errors(&r).contains("audit.jsonl:8: seq 9 follows seq 7"), "{}", errors(&r));

    // Swap two lines.
    let mut swapped = orig.clone();
    swapped.swap(1, 2);
    write_lines(&dir, &swapped);
    let r = check(&dir, &key);
    assert!(errors(&r).contains("audit.jsonl:2: seq 3 follows seq 1"), "{}", errors(&r));

    // Truncate the tail (drop the final checkpoint and two events): HEAD still vouches for them.
    let truncated = orig[..orig.len() - 3].to_vec();
    write_lines(&dir, &truncated);
    let r = check(&dir, &key);
    assert!(errors(&r).contains("truncated:") && errors(&r).contains("line(s) missing"), "{}", errors(&r));

    // Recompute the whole chain after an edit, without the signer.
    let mut rebuilt: Vec<Vec<u8>> = Vec::new();
    let mut prev = [0u8; 32];
    for (i, l) in orig.iter().enumerate() {
        let mut v: serde_json::Value = serde_json::from_slice(l).unwrap();
        if i == 2 {
            v["agent"] = serde_json::json!("mallory");
        }
        v["prev"] = serde_json::json!(data_encoding::HEXLOWER.encode(&prev));
        // serde_json keeps insertion order only with preserve_order; rebuild in the original order.
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        prev = event::line_hash(&line);
        rebuilt.push(line);
    }
    write_lines(&dir, &rebuilt);
    let r = check(&dir, &key);
    assert!(errors(&r).contains("the chain before this checkpoint was rewritten"), "{}", errors(&r));
    assert!(
        r.errors.iter().all(|e| !e.message.contains("prev does not match")),
        "the rebuilt chain itself is consistent: {}",
        errors(&r)
    );

    // A forged checkpoint (valid covers_hash, made-up signature) is refused too.
    let mut forged = rebuilt.clone();
    let last = forged.len() - 1;
    let mut v: serde_json::Value = serde_json::from_slice(&forged[last]).unwrap();
    let cs = v["outcome"]["covers_seq"].as_u64().unwrap() as usize;
    v["outcome"]["covers_hash"] = serde_json::json!(data_encoding::HEXLOWER.encode(&event::line_hash(&forged[cs - 1])));
    v["outcome"]["sig"] = serde_json::json!(data_encoding::BASE64.encode(&[1u8; 64]));
    forged[last] = [serde_json::to_vec(&v).unwrap(), b"\n".to_vec()].concat();
    write_lines(&dir, &forged);
    let r = check(&dir, &key);
    assert!(errors(&r).contains("checkpoint signature is not valid"), "{}", errors(&r));
}

#[test]
fn resume_after_restart_and_after_a_torn_write() {
    let dir = tempdir("resume");
    let key = write_log(&dir, 3, AuditConfig::default());
    // A crash in the middle of a write leaves a partial line.
    let mut f = OpenOptions::new().append(true).open(dir.join(ACTIVE)).unwrap();
    f.write_all(b"{\"v\":1,\"seq\":99,\"id\":\"torn").unwrap();
    drop(f);
    let key2 = write_log(&dir, 3, AuditConfig::default());
    assert_eq!(key, key2);
    let r = check(&dir, &key);
    assert!(r.ok(), "{}", errors(&r));
    assert_eq!(r.last_seq, Some(r.lines), "seq continues across restarts without gaps");
    assert!(!fs::read(dir.join(ACTIVE)).unwrap().windows(4).any(|w| w == b"torn"), "the torn bytes were cut");
}

#[test]
fn a_very_long_last_line_does_not_break_resumption() {
    let dir = tempdir("long");
    let signer = TestSigner::new();
    let long = "x".repeat(3 * 1024 * 1024);
    with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        log.record(event(0)).unwrap().durable().await.unwrap();
        log.record(Event::new(Kind::Broker, "big").outcome(serde_json::json!({ "blob": long })))
            .unwrap()
            .durable()
            .await
            .unwrap();
    });
    with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        assert_eq!(log.head().0, 2);
        log.record(event(1)).unwrap().durable().await.unwrap();
        log.checkpoint(&signer, true).await.unwrap();
    });
    let r = check(&dir, &signer.public());
    assert!(r.ok() && r.ends_cleanly, "{}", errors(&r));
    assert_eq!(r.lines, 4);
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempdir("rotate");
    let key = write_log(&dir, 40, AuditConfig { max_file_bytes: 2000, ..AuditConfig::default() });
    let files = log_files(&dir).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let r = check(&dir, &key);
    assert!(r.ok() && r.ends_cleanly, "{}", errors(&r));
    assert_eq!(r.lines, 40 + 8 + 1);
    // Removing a rotated file in the middle breaks the chain at the next file.
    fs::remove_file(&files[1]).unwrap();
    let r = check(&dir, &key);
    assert!(errors(&r).contains("line(s) missing or lines reordered"), "{}", errors(&r));
}

#[test]
fn a_full_disk_fails_closed() {
    let dir = tempdir("full");
    std::os::unix::fs::symlink("/dev/full", dir.join(ACTIVE)).unwrap();
    with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        let t = log.record(event(0)).unwrap();
        let e = t.durable().await.unwrap_err();
        assert!(e.to_string().contains("No space left on device"), "{e}");
        // Everything after is refused at once, with the reason.
        let later = log.record(event(1)).err().unwrap();
        assert!(later.to_string().contains("refusing actions that must be audited"), "{later}");
        assert!(log.failure().is_some());
    });
}

#[test]
fn query_selects_a_task_tree() {
    let root = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let child = "01BX5ZZKBKACTAV9WEVGEMMVRZ";
    let other = "01CCCCCCCCCCCCCCCCCCCCCCCC";
    let dir = tempdir("query");
    with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        for e in [
            Event::new(Kind::Task, "task_created").agent("a").task(root, vec![root.into()]),
            Event::new(Kind::Task, "task_created").agent("b").task(other, vec![other.into()]),
            Event::new(Kind::Task, "task_delegated").agent("a").task(child, vec![root.into(), child.into()]),
            Event::new(Kind::Decision, "authorize")
                .agent("a")
                .task(child, vec![root.into(), child.into()])
                .deny("policy_denies_role", "no"),
        ] {
            log.record(e).unwrap().durable().await.unwrap();
        }
    });
    let all = query::parse_all(&read_files(&dir));
    let tree = query::select(&all, &query::Filter { task: Some(child.into()), ..Default::default() });
    assert_eq!(
        tree.iter().map(|e| e["event"].as_str().unwrap()).collect::<Vec<_>>(),
        ["task_created", "task_delegated", "authorize"]
    );
    let denies = query::select(&all, &query::Filter { decision: Some("deny".into()), ..Default::default() });
    assert_eq!(denies.len(), 1);
    assert_eq!(query::select(&all, &query::Filter { agent: Some("b".into()), ..Default::default() }).len(), 1);
}

/// Appends `n` forged lines with a correct seq and prev (what anyone who can write the data dir
/// can do without the signer's key).
fn forge(dir: &Path, n: usize) {
    let ls = lines(dir);
    let last: serde_json::Value = serde_json::from_slice(ls.last().unwrap()).unwrap();
    let mut seq = last["seq"].as_u64().unwrap();
    let mut prev = event::line_hash(ls.last().unwrap());
    let mut out = ls.clone();
    for i in 0..n {
        seq += 1;
        let line = event::encode(&event(1000 + i), seq, "01ARZ3NDEKTSV4RRFFQ69G5FAV", 0, &prev);
        prev = event::line_hash(&line);
        out.push(line);
    }
    write_lines(dir, &out);
}

/// Hardening issue, defect 7: lines appended after a clean stop verified with a warning, and the
/// next start signed them.
#[test]
fn lines_added_after_a_clean_stop_are_refused_and_never_signed() {
    let dir = tempdir("forged-tail");
    let key = write_log(&dir, 6, AuditConfig::default());
    forge(&dir, 3);
    let r = check(&dir, &key);
    assert!(
        errors(&r).contains("3 line(s) (seq 9..=11) follow a clean stop (final checkpoint at seq 8)"),
        "{}",
        errors(&r)
    );
    // The next broker notices at once, and signs only what it writes.
    let signer = TestSigner::new();
    let tail = with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        let t = log.unsigned_tail().cloned();
        log.record(event(1)).unwrap().durable().await.unwrap();
        log.checkpoint(&signer, false).await.unwrap();
        log.checkpoint(&signer, true).await.unwrap();
        t
    });
    let t = tail.expect("the forged tail is reported at open");
    assert_eq!(t.lines, Some((9, 11)));
    assert!(t.after_clean_stop && t.describe().contains("no broker wrote them"), "{t:?}");
    let r = check(&dir, &key);
    assert!(errors(&r).contains("(seq 9..=11) follow a clean stop"), "still refused: {}", errors(&r));
    assert!(r.ends_cleanly);
}

/// Hardening issue, defect 7: a history rewritten with every checkpoint removed and HEAD deleted
/// verified clean.
#[test]
fn a_log_stripped_of_its_checkpoints_does_not_verify() {
    let dir = tempdir("stripped");
    let key = write_log(&dir, 8, AuditConfig::default());
    // Rebuild the chain from the events alone.
    let mut out = Vec::new();
    let mut prev = [0u8; 32];
    let events: Vec<serde_json::Value> = lines(&dir)
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] != "checkpoint")
        .collect();
    for (i, _) in events.iter().enumerate() {
        let line = event::encode(&event(i), i as u64 + 1, "01ARZ3NDEKTSV4RRFFQ69G5FAV", 0, &prev);
        prev = event::line_hash(&line);
        out.push(line);
    }
    write_lines(&dir, &out);
    fs::remove_file(dir.join(HEAD_FILE)).unwrap();
    let r = check(&dir, &key);
    assert!(!r.ok());
    assert!(errors(&r).contains("no valid checkpoint in 8 line(s)"), "{}", errors(&r));
}

/// A crash leaves lines after the last checkpoint: the next start reports them, does not sign
/// them, and verify warns (they cannot be told from forged ones) without failing.
#[test]
fn a_crash_tail_is_reported_and_left_unsigned() {
    let dir = tempdir("crash-tail");
    let signer = TestSigner::new();
    with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        log.record(event(0)).unwrap().durable().await.unwrap();
        log.checkpoint(&signer, false).await.unwrap();
        for i in 1..4 {
            log.record(event(i)).unwrap().durable().await.unwrap();
        }
        // Crash: no final checkpoint.
    });
    let tail = with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        let t = log.unsigned_tail().cloned();
        log.record(event(9)).unwrap().durable().await.unwrap();
        log.checkpoint(&signer, true).await.unwrap();
        t
    });
    let t = tail.expect("reported");
    assert_eq!(t.lines, Some((3, 5)), "{t:?}");
    assert!(!t.after_clean_stop);
    let r = check(&dir, &signer.public());
    assert!(r.ok(), "{}", errors(&r));
    assert!(
        r.warnings.iter().any(|w| w.message.contains("(seq 3..=5) were never signed by the broker that wrote them")),
        "{:?}",
        r.warnings
    );
    assert!(r.ends_cleanly);
}

/// A checkpoint signer that yields once before signing, so that lines are appended while the
/// checkpoint is being made (as on a busy broker).
struct Yielding<'a>(&'a TestSigner);

impl CheckpointSigner for Yielding<'_> {
    fn sign<'a>(&'a self, digest: [u8; 32]) -> Signed<'a> {
        Box::pin(async move {
            futures_lite::future::yield_now().await;
            self.0.sign(digest).await
        })
    }
}

/// A running broker's log, checked against its live (durable) head: a line written while a
/// checkpoint was being signed sits before that checkpoint's line but is covered by the next
/// one, so it is part of the pending tail, not "never signed"; the witness is the durable head.
#[test]
fn a_running_log_with_a_line_inside_a_checkpoint_verifies_with_its_live_head() {
    let dir = tempdir("running");
    let signer = TestSigner::new();
    let (live, in_memory) = with_log(&dir, AuditConfig::default(), async |log: Rc<AuditLog>| {
        log.record(event(0)).unwrap().durable().await.unwrap();
        let (c, ()) = futures_lite::future::zip(log.checkpoint(&Yielding(&signer), false), async {
            log.note(event(1)).unwrap();
        })
        .await;
        c.unwrap();
        log.record(event(2)).unwrap().durable().await.unwrap();
        // A read-only call's line lingers in memory: the live head vouches only for the disk.
        log.note(event(3)).unwrap();
        (log.durable_head(), log.head())
    });
    assert_eq!(live.0, 4, "seq 1, 2 (during the checkpoint), 3 (the checkpoint line), 4");
    assert_eq!(in_memory.0, 5);
    let witness = verify::Witness { source: "the running broker".into(), seq: live.0, hash: live.1 };
    let files: Vec<_> = read_files(&dir).into_iter().filter(|(_, b)| !b.is_empty()).collect();
    let mut files = files;
    // What the file held when the broker answered: up to the durable head.
    let cut: Vec<u8> = files[0].1.split_inclusive(|&b| b == b'\n').take(4).flatten().copied().collect();
    files[0].1 = cut;
    let r = verify::verify(&files, Some(&signer.public()), &[witness]);
    assert!(r.ok(), "{}", errors(&r));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].message.contains("the last 2 line(s) are after the last checkpoint"), "{:?}", r.warnings);
    assert!(!r.warnings.iter().any(|w| w.message.contains("never signed")), "{:?}", r.warnings);
}

#[test]
fn a_live_feed_batches_lines_and_counts_what_it_cannot_hold() {
    let tap = Tap::default();
    tap.push(b"{\"seq\":1}\n");
    tap.push(b"{\"seq\":2}\n");
    let (lines, skipped) = tap.take();
    assert_eq!(lines, b"{\"seq\":1}\n{\"seq\":2}\n");
    assert_eq!(skipped, 0);
    let big = vec![b'x'; TAP_BYTES / 2];
    tap.push(&big);
    tap.push(&big);
    tap.push(b"{\"seq\":3}\n");
    let (lines, skipped) = tap.take();
    assert_eq!(lines.len(), TAP_BYTES, "bounded");
    assert_eq!(skipped, 1, "the line that did not fit is counted");
    assert_eq!(tap.take(), (Vec::new(), 0));
}
