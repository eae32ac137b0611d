use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::clock::ManualClock;
use crate::datastore::sled_store::{open_db, AUDIT, AUDIT_HEAD_KEY, AUDIT_META};
use crate::datastore::SledStore;

fn audit_at(dir: &Path, clock: Arc<ManualClock>, export: Option<&Path>) -> Audit {
    let store: Arc<dyn DataStore> = Arc::new(SledStore::open(dir).unwrap());
    Audit::new(store, clock, export).unwrap()
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ))
}

async fn write_five(audit: &Audit) {
    for i in 0..5 {
        audit
            .record(
                AuditRecord::new("x509svid.issue", "spiffe://example.org/node/a")
                    .subject(format!("spiffe://example.org/agent/{i}"))
                    .field("serial", format!("0{i}"))
                    .field("scopes", ["crm:read"]),
            )
            .await
            .unwrap();
    }
}

/// Edits the store as an attacker with the files would: the server is not running (its
/// dropped store's flusher may still hold the lock for a moment, hence `open_db`).
fn with_raw_db(dir: &Path, f: impl FnOnce(&sled::Tree, &sled::Tree)) {
    let db = open_db(dir).unwrap();
    let log = db.open_tree(AUDIT).unwrap();
    let meta = db.open_tree(AUDIT_META).unwrap();
    f(&log, &meta);
    db.flush().unwrap();
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

#[tokio::test]
async fn records_chain_and_an_intact_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let audit = audit_at(dir.path(), clock(), None);
    let report = audit.verify().await.unwrap();
    assert!(report.is_intact() && report.records == 0);
    write_five(&audit).await;
    let all = audit.query(&AuditQuery::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(all[0].prev_hash, GENESIS_HASH);
    for pair in all.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert_eq!(all[2].fields["serial"], "02");
    assert_eq!(all[2].time, 1_700_000_000);
    let report = audit.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records, 5);
    assert_eq!(
        report.head,
        Some(AuditHead {
            seq: 5,
            hash: all[4].hash.clone()
        })
    );
}

#[tokio::test]
async fn the_log_survives_a_restart_and_keeps_chaining() {
    let dir = tempfile::tempdir().unwrap();
    let head = {
        let audit = audit_at(dir.path(), clock(), None);
        write_five(&audit).await;
        audit.verify().await.unwrap().head.unwrap()
    };
    let audit = audit_at(dir.path(), clock(), None);
    let r = audit
        .record(AuditRecord::new("entry.create", Actor::admin(Some(1000))))
        .await
        .unwrap();
    assert_eq!(r.seq, 6);
    assert_eq!(r.prev_hash, head.hash);
    assert_eq!(r.actor, "admin:uid:1000");
    assert!(audit.verify().await.unwrap().is_intact());
}

#[tokio::test]
async fn an_edited_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None)).await;
    with_raw_db(dir.path(), |log, _| {
        let v = log.get(key(3)).unwrap().unwrap();
        let text = String::from_utf8(v.to_vec())
            .unwrap()
            .replace("\"02\"", "\"ff\"");
        log.insert(key(3), text.as_bytes()).unwrap();
    });
    let report = audit_at(dir.path(), clock(), None).verify().await.unwrap();
    let p = report.problem.unwrap();
    assert_eq!(p.seq, 3);
    assert!(p.reason.contains("record 3 was altered"), "{}", p.reason);
}

#[tokio::test]
async fn an_edited_and_rehashed_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None)).await;
    with_raw_db(dir.path(), |log, _| {
        let v = log.get(key(2)).unwrap().unwrap();
        let mut r: SealedAuditRecord = serde_json::from_slice(&v).unwrap();
        r.actor = "someone-else".into();
        r.hash = record_hash(&r);
        log.insert(key(2), serde_json::to_vec(&r).unwrap()).unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 2, "{}", p.reason);
}

#[tokio::test]
async fn a_deleted_record_is_named_in_the_middle_and_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None)).await;
    with_raw_db(dir.path(), |log, _| {
        log.remove(key(4)).unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 4);
    assert_eq!(p.reason, "record 4 is missing");

    // The last record: only the checkpoint knows it existed.
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None)).await;
    with_raw_db(dir.path(), |log, _| {
        log.remove(key(5)).unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 5);
    assert!(p.reason.contains("record 5 is missing"), "{}", p.reason);
}

#[tokio::test]
async fn a_lost_checkpoint_or_an_unreadable_record_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None)).await;
    with_raw_db(dir.path(), |log, meta| {
        log.insert(key(1), b"{not json".to_vec()).unwrap();
        meta.remove(AUDIT_HEAD_KEY).unwrap();
    });
    let audit = audit_at(dir.path(), clock(), None);
    let p = audit.verify().await.unwrap().problem.unwrap();
    assert_eq!(p.seq, 1);
    assert!(p.reason.contains("no longer parses"), "{}", p.reason);
    // `show` skips what it cannot read rather than failing.
    assert_eq!(audit.query(&AuditQuery::default()).await.unwrap().len(), 4);
}

#[tokio::test]
async fn queries_filter_by_time_identity_and_action() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let audit = audit_at(dir.path(), clock.clone(), None);
    let node = spiffe::SpiffeId::new("spiffe://example.org/node/a").unwrap();
    audit
        .record(
            AuditRecord::new("entry.create", Actor::admin(Some(0)))
                .subject("spiffe://example.org/x"),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(100));
    audit
        .record(AuditRecord::new("node.attest", Actor::from(&node)).subject(&node))
        .await
        .unwrap();
    audit
        .record(
            AuditRecord::new("entry.delete", Actor::admin(Some(0)))
                .subject("spiffe://example.org/x"),
        )
        .await
        .unwrap();
    let actions = |q: AuditQuery| {
        let audit = &audit;
        async move {
            audit
                .query(&q)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.action)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        actions(AuditQuery {
            since: Some(1_700_000_050),
            ..Default::default()
        })
        .await,
        ["node.attest", "entry.delete"]
    );
    assert_eq!(
        actions(AuditQuery {
            action: Some("entry.*".into()),
            ..Default::default()
        })
        .await,
        ["entry.create", "entry.delete"]
    );
    assert_eq!(
        actions(AuditQuery {
            spiffe_id: Some(node.to_string()),
            ..Default::default()
        })
        .await,
        ["node.attest"]
    );
}

#[tokio::test]
async fn records_are_exported_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("audit.jsonl");
    let audit = audit_at(&dir.path().join("db"), clock(), Some(&export));
    write_five(&audit).await;
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<SealedAuditRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines, audit.query(&AuditQuery::default()).await.unwrap());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&export).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// The canonical form written out by hand: keys sorted at every level, no spaces, strings
/// escaped as JSON does (non-ASCII kept as UTF-8), a missing subject as `null`, after the
/// domain line. Its SHA-256 (computed outside this code, with `sha256sum`) is pinned too:
/// records already in a log must keep verifying, so the form may not drift.
const GOLDEN_CANONICAL: &str = concat!(
    "agentd-audit-v1\n",
    r#"{"action":"entry.create","actor":"uid:0","fields":{"n":null,"x":{"a":[1,{"b":"é\"q","z":0}],"k":1}},"#,
    r#""prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","#,
    r#""seq":7,"subject":"spiffe://example.org/a","time":1700000000}"#,
);
const GOLDEN_HASH: &str = "37714f76045bf95988593b23fa1acbb7e98c9377f8dd1facea60f06c56c91c29";

#[test]
fn the_hash_is_sha256_over_the_canonical_form() {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(GOLDEN_CANONICAL.as_bytes());
    assert_eq!(hex::encode(ctx.finish()), GOLDEN_HASH);
    let sealed = seal(
        AuditRecord::new("entry.create", "uid:0")
            .subject("spiffe://example.org/a")
            .field(
                "x",
                serde_json::json!({"k": 1, "a": [1, {"z": 0, "b": "é\"q"}]}),
            )
            .field("n", serde_json::Value::Null),
        7,
        1_700_000_000,
        GENESIS_HASH,
    );
    assert_eq!(sealed.hash, GOLDEN_HASH);
}

#[test]
fn the_hash_does_not_depend_on_key_order() {
    // The same record as JSON text in two key orders, at the top level and inside nested
    // field objects, as another writer (or serde_json with `preserve_order`, which feature
    // unification can switch on) might produce it. Both must hash to the golden value.
    let sorted = r#"{"action":"entry.create","actor":"uid:0","fields":{"n":null,"x":{"a":[1,{"b":"é\"q","z":0}],"k":1}},"hash":"","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","seq":7,"subject":"spiffe://example.org/a","time":1700000000}"#;
    let reversed = r#"{"time":1700000000,"subject":"spiffe://example.org/a","seq":7,"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","hash":"","fields":{"x":{"k":1,"a":[1,{"z":0,"b":"é\"q"}]},"n":null},"actor":"uid:0","action":"entry.create"}"#;
    for text in [sorted, reversed] {
        let r: SealedAuditRecord = serde_json::from_str(text).unwrap();
        assert_eq!(record_hash(&r), GOLDEN_HASH, "{text}");
    }
    // Array order is data, not layout: it changes the hash, as does any field.
    let swapped: SealedAuditRecord = serde_json::from_str(
        &sorted.replace(r#"[1,{"b":"é\"q","z":0}]"#, r#"[{"b":"é\"q","z":0},1]"#),
    )
    .unwrap();
    assert_ne!(record_hash(&swapped), GOLDEN_HASH);
    let mut changed: SealedAuditRecord = serde_json::from_str(sorted).unwrap();
    changed.time += 1;
    assert_ne!(record_hash(&changed), GOLDEN_HASH);
}
