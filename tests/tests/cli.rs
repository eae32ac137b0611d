//! The CLI's contract: one clear line naming the bad field, non-zero exit; `--output json`
//! prints exactly one JSON value; the admin socket is private.

use agentd_e2e::{agentd, Env, Node, Server};

fn fails_naming(server: &Server, args: &[&str], needle: &str) {
    let out = server.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agentd {args:?} should fail");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} should name {needle:?}"
    );
}

#[test]
fn bad_input_gets_one_line_naming_the_field() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let parent = "spiffe://example.org/node/n1";
    let create = |extra: &[&'static str]| {
        let mut a = vec!["entry", "create", "--parent-id", parent];
        a.extend_from_slice(extra);
        a
    };
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/bad path",
            "--selector",
            "unix:uid:1",
        ]),
        "spiffe_id",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "http://example.org/a",
            "--selector",
            "unix:uid:1",
        ]),
        "spiffe_id",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://other.org/a",
            "--selector",
            "unix:uid:1",
        ]),
        "trust domain",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "nocolon",
        ]),
        "selector",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "unix:uid:1",
            "--x509-svid-ttl",
            "0",
        ]),
        "x509_svid_ttl",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "unix:uid:1",
            "--jwt-svid-ttl",
            "9999d",
        ]),
        "jwt_svid_ttl",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "unix:uid:1",
            "--dns-name",
            "bad_name",
        ]),
        "dns_name",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "unix:uid:1",
            "--scope",
            "nocolon",
        ]),
        "scope",
    );
    fails_naming(
        &server,
        &create(&[
            "--spiffe-id",
            "spiffe://example.org/agentd/server",
            "--selector",
            "unix:uid:1",
        ]),
        "reserved",
    );
    fails_naming(
        &server,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/agentd/server",
        ],
        "reserved",
    );
    fails_naming(
        &server,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/n",
            "--ttl",
            "soon",
        ],
        "ttl",
    );
    fails_naming(&server, &["entry", "show", "--id", "nope"], "id");
    fails_naming(
        &server,
        &["entry", "show", "--id", "0123456789abcdef0123456789abcdef"],
        "not found",
    );
    fails_naming(
        &server,
        &[
            "entry",
            "delete",
            "--id",
            "0123456789abcdef0123456789abcdef",
        ],
        "not found",
    );
    fails_naming(
        &server,
        &[
            "node",
            "show",
            "--spiffe-id",
            "spiffe://example.org/node/none",
        ],
        "not found",
    );
    // A usage error is one line too.
    fails_naming(&server, &["entry", "create", "--bogus"], "--bogus");

    // Nothing half-written: the failed creates left no entries.
    let list: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
    assert_eq!(list, serde_json::json!([]));

    // A duplicate entry is refused.
    let args = [
        "entry",
        "create",
        "--parent-id",
        parent,
        "--spiffe-id",
        "spiffe://example.org/a",
        "--selector",
        "unix:uid:1",
    ];
    server.cli_ok(&args)?;
    fails_naming(&server, &args, "identical entry exists");
    Ok(())
}

#[test]
fn output_json_is_one_value_for_every_data_command() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let uid = agentd_e2e::current_uid().to_string();
    let sel = format!("unix:uid:{uid}");
    let created: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "entry",
        "create",
        "--parent-id",
        &node.spiffe_id,
        "--spiffe-id",
        "spiffe://example.org/agent/j",
        "--selector",
        &sel,
        "--scope",
        "crm:read",
        "--owner",
        "alice@example.com",
        "--output",
        "json",
    ])?)?;
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["scopes"], serde_json::json!(["crm:read"]));
    assert_eq!(created["owner"], "alice@example.com");
    node.wait_for_svid("spiffe://example.org/agent/j")?;
    // An entry may not take an attested node's ID (that node would serve its children).
    let out = server.cli(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/node/other",
        "--spiffe-id",
        &node.spiffe_id,
        "--selector",
        &sel,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("attested node"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = node.socket_arg();
    let admin: Vec<Vec<&str>> = vec![
        vec!["entry", "show", "--id", &id],
        vec!["entry", "show"],
        vec!["entry", "update", "--id", &id, "--hint", "h"],
        vec!["node", "list"],
        vec!["node", "show", "--spiffe-id", &node.spiffe_id],
        vec!["bundle", "show", "--format", "pem"],
        vec!["bundle", "show", "--format", "spiffe"],
        vec![
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/n2",
        ],
    ];
    for args in admin {
        let mut a = args.clone();
        a.extend(["--output", "json"]);
        let out = server.cli_ok(&a)?;
        serde_json::from_str::<serde_json::Value>(&out)
            .map_err(|e| anyhow::anyhow!("{args:?}: {e}: {out}"))?;
    }
    let workload: Vec<Vec<&str>> = vec![
        vec!["api", "fetch", "x509", "--socket-path", &sock],
        vec![
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--socket-path",
            &sock,
        ],
        vec!["healthcheck", "--socket-path", &sock],
    ];
    for args in workload {
        let mut a = args.clone();
        a.extend(["--output", "json"]);
        let out = agentd(&a);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)?;
    }
    // api validate jwt round-trips the token from api fetch jwt.
    let jwt: serde_json::Value = serde_json::from_slice(
        &agentd(&[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--socket-path",
            &sock,
            "--output",
            "json",
        ])
        .stdout,
    )?;
    let token = jwt["svids"][0]["svid"].as_str().unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &agentd(&[
            "api",
            "validate",
            "jwt",
            "--audience",
            "a",
            "--svid",
            token,
            "--socket-path",
            &sock,
            "--output",
            "json",
        ])
        .stdout,
    )?;
    assert_eq!(v["spiffe_id"], "spiffe://example.org/agent/j");
    assert_eq!(v["claims"]["aud"], "a");
    // Entry delete prints the deleted entry.
    let deleted: serde_json::Value = serde_json::from_str(
        &server.cli_ok(&["entry", "delete", "--id", &id, "--output", "json"])?,
    )?;
    assert_eq!(deleted["id"], id.as_str());
    Ok(())
}

#[test]
fn admin_socket_is_private_and_workload_socket_is_open() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    // The admin socket goes into an existing, shared directory: its mode is left alone.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755))?;
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let dir_mode = std::fs::metadata(env.path())?.permissions().mode() & 0o777;
    assert_eq!(
        dir_mode, 0o755,
        "the server must not change the mode of a directory it did not create"
    );
    let admin_mode = std::fs::metadata(&server.admin_socket)?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(admin_mode, 0o600, "admin socket");
    let workload_mode = std::fs::metadata(&node.socket)?.permissions().mode() & 0o777;
    assert_eq!(
        workload_mode, 0o777,
        "the Workload API socket is connectable by every local user"
    );
    // One X.509 CA key and one JWT key (`x509-<id>.key`, `jwt-<kid>.key`), both private.
    let mut keys = Vec::new();
    for f in std::fs::read_dir(server.data_dir.join("keys"))? {
        let path = f?.path();
        if path.extension().is_some_and(|e| e == "key") {
            keys.push(path);
        }
    }
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in keys {
        let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let mode = std::fs::metadata(node.data_dir.join("node-svid.key"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "node key");
    Ok(())
}

#[test]
fn server_runs_with_no_config_and_rejects_a_bad_config_naming_every_field() -> anyhow::Result<()> {
    let env = Env::new();
    let cfg = env.path().join("server.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"Bad Domain\"\ndefault_x509_svid_ttl = \"0\"\n",
    )?;
    let out = agentd(&[
        "server",
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        env.path().join("d").to_str().unwrap(),
        "--admin-socket",
        env.path().join("a.sock").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trust_domain") && stderr.contains("default_x509_svid_ttl"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    std::fs::write(&cfg, "trust_domian = \"x\"\n")?;
    let out = agentd(&["server", "run", "--config", cfg.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust_domian"));
    Ok(())
}
