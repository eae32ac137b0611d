use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::clock::ManualClock;
use crate::datastore::sled_store::{open_db, AUDIT, AUDIT_HEAD_KEY, AUDIT_META};
use crate::datastore::SledStore;

/// The audit log of a server whose data dir is `dir`: the store in `dir/db`, the key in
/// `dir/audit.key`.
async fn audit_at(dir: &Path, clock: Arc<ManualClock>, export: Option<&Path>) -> Audit {
    try_audit_at(dir, clock, export).await.unwrap()
}

async fn try_audit_at(
    dir: &Path,
    clock: Arc<ManualClock>,
    export: Option<&Path>,
) -> Result<Audit, AuditError> {
    let store: Arc<dyn DataStore> = Arc::new(SledStore::open(&dir.join("db")).unwrap());
    Audit::open(store, clock, export, &dir.join(key::KEY_FILE), "s1").await
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
    let db = open_db(&dir.join("db")).unwrap();
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
    let audit = audit_at(dir.path(), clock(), None).await;
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
            hash: all[4].hash.clone(),
            mac: report.head.as_ref().and_then(|h| h.mac.clone()),
        })
    );
}

#[tokio::test]
async fn the_log_survives_a_restart_and_keeps_chaining() {
    let dir = tempfile::tempdir().unwrap();
    let head = {
        let audit = audit_at(dir.path(), clock(), None).await;
        write_five(&audit).await;
        audit.verify().await.unwrap().head.unwrap()
    };
    let audit = audit_at(dir.path(), clock(), None).await;
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
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, _| {
        let v = log.get(key(3)).unwrap().unwrap();
        let text = String::from_utf8(v.to_vec())
            .unwrap()
            .replace("\"02\"", "\"ff\"");
        log.insert(key(3), text.as_bytes()).unwrap();
    });
    let report = audit_at(dir.path(), clock(), None)
        .await
        .verify()
        .await
        .unwrap();
    let p = report.problem.unwrap();
    assert_eq!(p.seq, 3);
    assert!(p.reason.contains("record 3 was altered"), "{}", p.reason);
}

#[tokio::test]
async fn an_edited_and_rehashed_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, _| {
        let v = log.get(key(2)).unwrap().unwrap();
        let mut r: SealedAuditRecord = serde_json::from_slice(&v).unwrap();
        r.actor = "someone-else".into();
        r.hash = record_hash(&r);
        log.insert(key(2), serde_json::to_vec(&r).unwrap()).unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .await
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
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, _| {
        log.remove(key(4)).unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .await
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 4);
    assert_eq!(p.reason, "record 4 is missing");

    // The last record: only the checkpoint knows it existed.
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, _| {
        log.remove(key(5)).unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .await
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
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, meta| {
        log.insert(key(1), b"{not json".to_vec()).unwrap();
        meta.remove(AUDIT_HEAD_KEY).unwrap();
    });
    let audit = audit_at(dir.path(), clock(), None).await;
    let p = audit.verify().await.unwrap().problem.unwrap();
    assert_eq!(p.seq, 1);
    assert!(p.reason.contains("no longer parses"), "{}", p.reason);
    // `show` skips what it cannot read rather than failing.
    assert_eq!(audit.query(&AuditQuery::default()).await.unwrap().len(), 4);
}

/// Pages of a query: each at most the limit, every match once and in order, the filter
/// applied across pages, and no next page after the last.
#[tokio::test]
async fn a_query_comes_in_pages_that_hold_every_match_once() {
    let dir = tempfile::tempdir().unwrap();
    let audit = audit_at(dir.path(), clock(), None).await;
    for i in 0..25 {
        let action = if i % 5 == 0 {
            "entry.delete"
        } else {
            "entry.create"
        };
        audit
            .record(
                AuditRecord::new(action, Actor::admin(Some(0)))
                    .subject(format!("spiffe://example.org/w/{i}")),
            )
            .await
            .unwrap();
    }
    let pages = |q: AuditQuery| {
        let audit = &audit;
        async move {
            let mut after = 0;
            let mut pages: Vec<Vec<u64>> = Vec::new();
            loop {
                let (page, next) = audit.query_page(&q, after, 7).await.unwrap();
                assert!(page.len() <= 7);
                pages.push(page.iter().map(|r| r.seq).collect());
                match next {
                    Some(n) => after = n,
                    None => return pages,
                }
            }
        }
    };
    let all = pages(AuditQuery::default()).await;
    assert_eq!(all.concat(), (1..=25).collect::<Vec<u64>>());
    assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), [7, 7, 7, 4]);
    let deletes = pages(AuditQuery {
        action: Some("entry.delete".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(deletes.concat(), [1, 6, 11, 16, 21]);
}

#[tokio::test]
async fn queries_filter_by_time_identity_and_action() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let audit = audit_at(dir.path(), clock.clone(), None).await;
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
    let audit = audit_at(&dir.path().join("db"), clock(), Some(&export)).await;
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
        &AuditKey::generate(),
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

fn read_record(log: &sled::Tree, seq: u64) -> SealedAuditRecord {
    serde_json::from_slice(&log.get(key(seq)).unwrap().unwrap()).unwrap()
}

/// Rewrites record `at` with `edit`, then re-chains and re-hashes every record after it and
/// the checkpointed head, as someone with write access to the store (but not the key) would.
/// `strip` also drops the MACs of every record touched and of the head.
fn rewrite_and_rechain(
    log: &sled::Tree,
    meta: &sled::Tree,
    at: u64,
    last: u64,
    strip: bool,
    edit: impl FnOnce(&mut SealedAuditRecord),
) {
    let mut prev = if at == 1 {
        GENESIS_HASH.to_string()
    } else {
        read_record(log, at - 1).hash
    };
    let mut r = read_record(log, at);
    edit(&mut r);
    for seq in at..=last {
        if seq > at {
            r = read_record(log, seq);
        }
        r.prev_hash = prev.clone();
        r.hash = record_hash(&r);
        if strip {
            r.mac = None;
        }
        log.insert(key(seq), serde_json::to_vec(&r).unwrap())
            .unwrap();
        prev = r.hash.clone();
    }
    let mut head: AuditHead =
        serde_json::from_slice(&meta.get(AUDIT_HEAD_KEY).unwrap().unwrap()).unwrap();
    head.hash = prev;
    if strip {
        head.mac = None;
    }
    meta.insert(AUDIT_HEAD_KEY, serde_json::to_vec(&head).unwrap())
        .unwrap();
}

#[tokio::test]
async fn a_record_rewritten_with_the_chain_and_head_recomputed_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, meta| {
        rewrite_and_rechain(log, meta, 3, 5, false, |r| r.actor = "someone-else".into());
    });
    let p = audit_at(dir.path(), clock(), None)
        .await
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 3, "{}", p.reason);
    assert!(p.reason.contains("record 3 was altered"), "{}", p.reason);
    assert!(p.reason.contains("MAC does not match"), "{}", p.reason);
}

#[tokio::test]
async fn stripping_the_macs_of_a_rewrite_does_not_hide_it() {
    // The MACs of the rewritten records and the head dropped: named where they stop.
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, meta| {
        rewrite_and_rechain(log, meta, 2, 5, true, |r| r.actor = "someone-else".into());
    });
    let audit = audit_at(dir.path(), clock(), None).await;
    let p = audit.verify().await.unwrap().problem.unwrap();
    assert_eq!(p.seq, 2, "{}", p.reason);
    assert!(p.reason.contains("has no MAC"), "{}", p.reason);

    // Every MAC dropped, from the first record on: it does not pass as a log from before
    // the key.
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, meta| {
        rewrite_and_rechain(log, meta, 1, 5, true, |r| r.actor = "someone-else".into());
    });
    let p = audit_at(dir.path(), clock(), None)
        .await
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 5, "{}", p.reason);
    assert!(
        p.reason
            .contains("checkpointed head (record 5) was altered"),
        "{}",
        p.reason
    );
}

#[tokio::test]
async fn a_log_cut_short_with_a_head_made_from_the_new_last_record_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    with_raw_db(dir.path(), |log, meta| {
        log.remove(key(5)).unwrap();
        let four = read_record(log, 4);
        // The record's own MAC does not stand in for the head's.
        let head = AuditHead {
            seq: 4,
            hash: four.hash.clone(),
            mac: four.mac.clone(),
        };
        meta.insert(AUDIT_HEAD_KEY, serde_json::to_vec(&head).unwrap())
            .unwrap();
    });
    let p = audit_at(dir.path(), clock(), None)
        .await
        .verify()
        .await
        .unwrap()
        .problem
        .unwrap();
    assert_eq!(p.seq, 4, "{}", p.reason);
    assert!(p.reason.contains("its MAC does not match"), "{}", p.reason);
}

#[tokio::test]
async fn the_key_is_made_once_with_mode_0600_and_a_signed_log_needs_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join(key::KEY_FILE);
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    let bytes = std::fs::read(&key_path).unwrap();
    assert_eq!(bytes.len(), 32);
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Reopened: the same key, and the log verifies.
    let audit = audit_at(dir.path(), clock(), None).await;
    assert!(audit.verify().await.unwrap().is_intact());
    assert_eq!(std::fs::read(&key_path).unwrap(), bytes);
    assert_eq!(format!("{:?}", audit.key), "AuditKey(<redacted>)");

    // Every record names the server that wrote it.
    let all = audit.query(&AuditQuery::default()).await.unwrap();
    assert!(all.iter().all(|r| r.fields["server"] == "s1"), "{all:?}");
    drop(audit);

    // Another key (another server's, say): refused before it signs anything, since what
    // it signed could never be verified with the log's key.
    std::fs::write(&key_path, [7u8; 32]).unwrap();
    let err = try_audit_at(dir.path(), clock(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not the key that signed the audit log") && err.contains("copy audit.key"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        [7u8; 32],
        "the file is kept"
    );

    // Not a key: refused, naming the file and why.
    std::fs::write(&key_path, b"short").unwrap();
    let err = try_audit_at(dir.path(), clock(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key_path.display().to_string()), "{err}");
    assert!(err.contains("holds 5 bytes, expected exactly 32"), "{err}");

    // Gone, while the log is signed: refused rather than replaced.
    std::fs::remove_file(&key_path).unwrap();
    let err = try_audit_at(dir.path(), clock(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is missing, but the audit log was signed"),
        "{err}"
    );
    assert!(!key_path.exists(), "no new key is made");
}

/// Two servers on one store with keys of their own: the second key is refused even when
/// nothing is signed yet (the first key was recorded when it opened the log), and keeps its
/// file.
#[tokio::test]
async fn a_second_key_is_refused_on_a_log_with_nothing_signed_yet() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join(key::KEY_FILE);
    drop(audit_at(dir.path(), clock(), None).await);
    std::fs::remove_file(&key_path).unwrap();
    std::fs::write(&key_path, [9u8; 32]).unwrap();
    let err = try_audit_at(dir.path(), clock(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not the key of the audit log"), "{err}");
    assert_eq!(std::fs::read(&key_path).unwrap(), [9u8; 32]);
    // A fresh key made at start (no file) is refused the same way.
    std::fs::remove_file(&key_path).unwrap();
    let err = try_audit_at(dir.path(), clock(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("this file was just made"), "{err}");
}

#[tokio::test]
async fn a_log_from_before_the_key_is_adopted_by_a_signed_record() {
    let dir = tempfile::tempdir().unwrap();
    write_five(&audit_at(dir.path(), clock(), None).await).await;
    // As the log was before it had a key: no MACs, no key file.
    with_raw_db(dir.path(), |log, meta| {
        for seq in 1..=5 {
            let mut r = read_record(log, seq);
            r.mac = None;
            log.insert(key(seq), serde_json::to_vec(&r).unwrap())
                .unwrap();
        }
        let mut head: AuditHead =
            serde_json::from_slice(&meta.get(AUDIT_HEAD_KEY).unwrap().unwrap()).unwrap();
        head.mac = None;
        meta.insert(AUDIT_HEAD_KEY, serde_json::to_vec(&head).unwrap())
            .unwrap();
        // Nor a recorded key fingerprint.
        meta.remove(b"key_id").unwrap();
    });
    std::fs::remove_file(dir.path().join(key::KEY_FILE)).unwrap();
    let audit = audit_at(dir.path(), clock(), None).await;
    let report = audit.verify().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    let all = audit.query(&AuditQuery::default()).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[5].action, "audit.key.create");
    assert_eq!(all[5].fields["unsigned_records"], 5);
    assert!(all[5].mac.is_some());
}

fn exported(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<SealedAuditRecord>(l).unwrap().seq)
        .collect()
}

#[tokio::test]
async fn the_export_gets_back_what_a_crash_kept_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("audit.jsonl");
    write_five(&audit_at(dir.path(), clock(), Some(&export)).await).await;
    assert_eq!(exported(&export), [1, 2, 3, 4, 5]);
    // A crash after the store's commit: records 4 and 5 never reached the file, and the
    // write of 4 stopped halfway.
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = format!(
        "{}\n{}\n{}\n{}",
        lines[0],
        lines[1],
        lines[2],
        &lines[3][..20]
    );
    std::fs::write(&export, cut).unwrap();
    let audit = audit_at(dir.path(), clock(), Some(&export)).await;
    assert_eq!(exported(&export), [1, 2, 3, 4, 5]);
    let from_file: Vec<SealedAuditRecord> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        from_file,
        audit.query(&AuditQuery::default()).await.unwrap()
    );
    audit
        .record(AuditRecord::new("entry.create", Actor::Server))
        .await
        .unwrap();
    assert_eq!(exported(&export), [1, 2, 3, 4, 5, 6]);
    drop(audit);

    // A new (or emptied) file starts with the record the log ends at.
    std::fs::write(&export, "").unwrap();
    drop(audit_at(dir.path(), clock(), Some(&export)).await);
    assert_eq!(exported(&export), [6]);

    // A file ending beyond the log is not continued.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let err = try_audit_at(&other, clock(), Some(&export))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("it ends at record 6 but the log ends at record"),
        "{err}"
    );
    // Nor one whose last line is not a record.
    std::fs::write(&export, "not json\n").unwrap();
    let err = try_audit_at(dir.path(), clock(), Some(&export))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("its last line is not an audit record"),
        "{err}"
    );
}

fn minted(serial: &str) -> IssuedSvid {
    IssuedSvid {
        kind: crate::model::revocation::SvidKind::X509,
        id: serial.into(),
        spiffe_id: "spiffe://example.org/agent/a".into(),
        entry_id: None,
        node_id: None,
        grant_chain: vec![],
        task_id: None,
        authority_id: "ca".into(),
        expires_at: 1_800_000_000,
        derived_from: None,
    }
}

/// Mints that wait for the writer's turn together are written together: one flush for
/// all of them, each caller getting back its own records, in its order, on one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issuance_writes_share_one_flush() {
    const CALLERS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let sled = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
    let store: Arc<dyn DataStore> = sled.clone();
    let audit = Arc::new(Audit::new(store.clone(), clock(), None).unwrap());
    // Another writer has the turn while every caller queues its write.
    let turn = audit.export.lock().await;
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let audit = audit.clone();
            tokio::spawn(async move {
                let records = (0..1 + c % 3)
                    .map(|k| {
                        AuditRecord::new("x509svid.issue", "spiffe://example.org/node/a")
                            .field("caller", c)
                            .field("k", k)
                    })
                    .collect();
                let sealed = audit
                    .record_issuance(&[minted(&format!("{c:02}"))], records)
                    .await
                    .unwrap();
                (c, sealed)
            })
        })
        .collect();
    while audit.lock_queue().len() < CALLERS {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let flushes_before = sled.flushes.load(std::sync::atomic::Ordering::SeqCst);
    drop(turn);
    let mut seqs = Vec::new();
    for caller in callers {
        let (c, sealed) = caller.await.unwrap();
        assert_eq!(sealed.len(), 1 + c % 3, "caller {c}");
        for (k, s) in sealed.iter().enumerate() {
            assert_eq!(s.fields["caller"], serde_json::json!(c));
            assert_eq!(s.fields["k"], serde_json::json!(k));
            seqs.push(s.seq);
        }
    }
    assert_eq!(
        sled.flushes.load(std::sync::atomic::Ordering::SeqCst) - flushes_before,
        1,
        "one flush for the group"
    );
    seqs.sort_unstable();
    let total: usize = (0..CALLERS).map(|c| 1 + c % 3).sum();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    assert_eq!(store.list_issued(0).await.unwrap().len(), CALLERS);
    assert!(audit.verify().await.unwrap().is_intact());
}

/// A group write that fails fails for every caller in it: none hands out an SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_write_fails_every_caller_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let sled = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
    let audit = Arc::new(Audit::new(sled.clone(), clock(), None).unwrap());
    let turn = audit.export.lock().await;
    let callers: Vec<_> = (0..3)
        .map(|c| {
            let audit = audit.clone();
            tokio::spawn(async move {
                audit
                    .record_issuance(
                        &[minted(&format!("{c:02}"))],
                        vec![AuditRecord::new("x509svid.issue", "n")],
                    )
                    .await
            })
        })
        .collect();
    while audit.lock_queue().len() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sled.fail_flushes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let flushes_before = sled.flushes.load(std::sync::atomic::Ordering::SeqCst);
    drop(turn);
    for caller in callers {
        let err = caller.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("flush failed"), "{err}");
    }
    assert_eq!(
        sled.flushes.load(std::sync::atomic::Ordering::SeqCst) - flushes_before,
        1,
        "one write for the group, and its error for each caller"
    );
}

/// A caller that gives up while its write waits (its client went away) is not written:
/// its mint hands nothing out; the others in the group are written and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_while_queued_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let sled = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
    let store: Arc<dyn DataStore> = sled.clone();
    let audit = Arc::new(Audit::new(store.clone(), clock(), None).unwrap());
    let turn = audit.export.lock().await;
    let callers: Vec<_> = (0..3)
        .map(|c| {
            let audit = audit.clone();
            tokio::spawn(async move {
                audit
                    .record_issuance(
                        &[minted(&format!("{c:02}"))],
                        vec![AuditRecord::new("x509svid.issue", "n").field("caller", c)],
                    )
                    .await
            })
        })
        .collect();
    while audit.lock_queue().len() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut callers = callers.into_iter();
    let gave_up = callers.next().unwrap();
    gave_up.abort();
    assert!(gave_up.await.unwrap_err().is_cancelled());
    drop(turn);
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().len(), 1);
    }
    let mut issued: Vec<String> = store
        .list_issued(0)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    issued.sort();
    assert_eq!(issued, ["01", "02"]);
    assert_eq!(store.audit_head().await.unwrap().unwrap().seq, 2);
}
