use super::*;

#[test]
fn the_lifecycle_table() {
    use AgentState::*;
    let all = [Provisioned, Active, Idle, Suspended, Revoked, Decommissioned];
    let legal = [
        (Provisioned, Active),
        (Provisioned, Revoked),
        (Provisioned, Decommissioned),
        (Active, Idle),
        (Active, Suspended),
        (Active, Revoked),
        (Idle, Active),
        (Idle, Suspended),
        (Idle, Revoked),
        (Idle, Decommissioned),
        (Suspended, Active),
        (Suspended, Revoked),
        (Revoked, Decommissioned),
    ];
    for from in all {
        for to in all {
            assert_eq!(from.can_become(to), legal.contains(&(from, to)), "{from:?} → {to:?}");
        }
    }
    // Nothing comes back from revoked or decommissioned; only active and idle are served.
    assert!(!Revoked.can_become(Active) && !Decommissioned.can_become(Active));
    assert_eq!(all.iter().filter(|s| s.serves()).count(), 2);
    assert!(Active.serves() && Idle.serves());
}

#[test]
fn compaction_replays_to_the_same_state() {
    let mut entries = BTreeMap::new();
    let mut joins = HashMap::new();
    let digest = "ab".repeat(32);
    let (_, stored) = crate::broker::auth::api_key::generate().unwrap();
    for rec in [
        Record::Enrolled {
            name: "bot".into(),
            owner: "alice".into(),
            template: "t".into(),
            by: "op".into(),
            at: 10,
            join: digest.clone(),
            expires: 100,
        },
        Record::Joined { name: "bot".into(), at: 20, key_hash: Some(stored.clone()), jwk: None },
        Record::Attested { name: "bot".into(), at: 21, subject: "system:serviceaccount:ci:runner".into() },
        Record::State { name: "bot".into(), to: AgentState::Active, by: "a".into(), at: 20, reason: "joined".into() },
        Record::State { name: "bot".into(), to: AgentState::Idle, by: "r".into(), at: 30, reason: "x".into() },
        Record::State { name: "bot".into(), to: AgentState::Revoked, by: "o".into(), at: 40, reason: "gone".into() },
        Record::Seen { name: "claude".into(), at: 5 },
        Record::Used { name: "claude".into(), at: 50, grants: vec!["ssh:web".into()] },
        Record::State { name: "claude".into(), to: AgentState::Suspended, by: "o".into(), at: 60, reason: "".into() },
    ] {
        apply(&mut entries, &mut joins, rec).unwrap();
    }
    let mut again = BTreeMap::new();
    let mut joins2 = HashMap::new();
    for raw in compact(&entries) {
        apply(&mut again, &mut joins2, serde_json::from_slice(&raw).unwrap()).unwrap();
    }
    for name in ["bot", "claude"] {
        let (a, b) = (&entries[name], &again[name]);
        assert_eq!((a.state, a.since, &a.by, &a.reason), (b.state, b.since, &b.by, &b.reason), "{name}");
        assert_eq!((a.first_seen, a.last_used, &a.exercised), (b.first_seen, b.last_used, &b.exercised), "{name}");
    }
    assert_eq!(again["bot"].enrollment.as_ref().unwrap().key_hash.as_deref(), Some(stored.as_str()));
    assert_eq!(
        again["bot"].enrollment.as_ref().unwrap().attested,
        Some((21, "system:serviceaccount:ci:runner".into()))
    );
    assert_eq!(joins2.get(&digest).map(String::as_str), Some("bot"));
}

#[test]
fn records_that_contradict_the_lifecycle_stop_replay() {
    let mut entries = BTreeMap::new();
    let mut joins = HashMap::new();
    let bad = [
        (r#"{"t":"state","name":"a","to":"revoked","by":"x","at":1,"reason":""}"#, None),
        (
            r#"{"t":"state","name":"a","to":"active","by":"x","at":2,"reason":""}"#,
            Some("revoked → active is not a transition"),
        ),
        (r#"{"t":"joined","name":"ghost","at":1,"key_hash":"x"}"#, Some("never enrolled")),
        (
            r#"{"t":"enrolled","name":"../x","owner":"o","template":"t","by":"b","at":1,"join":"00","expires":2}"#,
            Some("not a valid agent name"),
        ),
        (
            r#"{"t":"enrolled","name":"b","owner":"o","template":"t","by":"b","at":1,"join":"00","expires":2}"#,
            Some("not SHA-256 hex"),
        ),
    ];
    for (line, want) in bad {
        let r = apply(&mut entries, &mut joins, serde_json::from_str(line).unwrap());
        match want {
            None => r.unwrap(),
            Some(w) => assert!(r.unwrap_err().contains(w), "{line}"),
        }
    }
}
