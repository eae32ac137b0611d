//! Workload attestation with real processes under different uids (CI runs as root; without
//! root these tests say so and return).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use agentd_e2e::{agentd_bin, current_uid, Env, Node, Server};

/// Runs `agentd <args>` as `uid`/`gid`.
fn agentd_as(uid: u32, args: &[&str]) -> Output {
    Command::new(agentd_bin())
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("running agentd as another user")
}

fn fetched_ids(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn each_process_gets_only_the_svids_whose_selectors_match_it() -> anyhow::Result<()> {
    if current_uid() != 0 {
        eprintln!("skipped: starting processes under other uids needs root (CI runs as root)");
        return Ok(());
    }
    let env = Env::new();
    // Other users must reach the Workload API socket inside the test's private dir.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755))?;
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let nobody = "spiffe://example.org/agent/nobody";
    let mine = "spiffe://example.org/agent/mine";
    let both = "spiffe://example.org/agent/nobody-group";
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        nobody,
        "--selector",
        "unix:uid:65534",
        "--hint",
        "nobody",
    ])?;
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        mine,
        "--selector",
        &format!("unix:uid:{}", current_uid()),
    ])?;
    // All selectors must match: uid 65534 *and* gid 65534.
    server.create_entry(&[
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        both,
        "--selector",
        "unix:uid:65534",
        "--selector",
        "unix:gid:65534",
        "--hint",
        "both",
    ])?;
    node.wait_for_svid(mine)?;
    let sock = node.socket_arg();
    let fetch = [
        "api",
        "fetch",
        "x509",
        "--output",
        "json",
        "--socket-path",
        sock.as_str(),
    ];

    // uid 65534: its two entries, in a stable order, and never ours.
    let mut got = Vec::new();
    assert!(agentd_e2e::wait_until(
        std::time::Duration::from_secs(15),
        || {
            let out = agentd_as(65534, &fetch);
            out.status.success() && {
                got = fetched_ids(&out);
                got.len() == 2
            }
        }
    ));
    assert_eq!(got, [nobody, both], "sorted by SPIFFE ID");
    assert_eq!(
        fetched_ids(&agentd_as(65534, &fetch)),
        got,
        "the same order every time"
    );

    // This process: only its own.
    assert_eq!(fetched_ids(&agentd_e2e::agentd(&fetch)), [mine]);

    // A uid with no entry: PermissionDenied, "no identity issued".
    let out = agentd_as(65533, &fetch);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));

    // `api selectors` shows a process what it was attested with.
    let out = agentd_as(
        65534,
        &[
            "api",
            "selectors",
            "--output",
            "json",
            "--socket-path",
            &sock,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let selectors: Vec<&str> = v["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        selectors.contains(&"unix:uid:65534") && selectors.contains(&"unix:gid:65534"),
        "{selectors:?}"
    );
    assert_eq!(v["spiffe_ids"], serde_json::json!([nobody, both]));
    Ok(())
}
