//! The CLI's contract: one clear line naming the bad field, non-zero exit; `--output json`
//! prints exactly one JSON value; the admin socket is private.

use std::time::Duration;

use agentd_e2e::{agentd, agentd_bin, agentd_node_bin, Daemon, Env, Node, Server};

/// A runtime error: exit 1, nothing on stdout, one `error:` line naming `needle`.
fn fails_naming(server: &Server, args: &[&str], needle: &str) {
    let out = server.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "agentd {args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
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
    // (Usage errors, bad TTLs among them, are clap's: see usage_errors_keep_clap_s_message.)

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

/// A usage error: exit 2, nothing on stdout, clap's whole message on stderr, whose first line
/// is `error: ...`; every one of `needles` in it.
fn usage_error(args: &[&str], needles: &[&str]) -> String {
    let out = agentd(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "agentd {args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "agentd {args:?}: stdout not empty");
    assert!(stderr.starts_with("error: "), "agentd {args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "agentd {args:?}: {stderr:?} should contain {needle:?}"
        );
    }
    stderr
}

#[test]
fn usage_errors_keep_clap_s_message() {
    // A missing required flag is named, also the ones clap enforces for `entry create`.
    usage_error(&["entry", "delete"], &["required arguments", "--id <ID>"]);
    usage_error(&["api", "fetch", "jwt"], &["--audience <AUDIENCE>"]);
    usage_error(
        &["entry", "create", "--parent-id", "spiffe://example.org/n"],
        &[
            "--spiffe-id <SPIFFE_ID>",
            "--selector <TYPE:VALUE>",
            "Usage:",
        ],
    );
    usage_error(
        &[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/n",
            "--spiffe-id",
            "spiffe://example.org/a",
        ],
        &["--selector <TYPE:VALUE>"],
    );
    // A bad value lists the valid ones; a near miss gets a suggestion.
    usage_error(
        &["--output", "yaml", "entry", "show"],
        &["'yaml'", "[possible values: text, json]"],
    );
    usage_error(
        &["entry", "lst"],
        &["'lst'", "similar subcommand exists: 'list'"],
    );
    usage_error(&["entry", "create", "--bogus"], &["--bogus"]);

    // TTLs are parsed as the command line is: the message says what a TTL is.
    let create = |ttl_flag: &'static str, value: &'static str| {
        vec![
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/n",
            "--spiffe-id",
            "spiffe://example.org/a",
            "--selector",
            "unix:uid:1",
            ttl_flag,
            value,
        ]
    };
    let abc = usage_error(
        &create("--x509-svid-ttl", "abc"),
        &[
            "invalid value 'abc' for '--x509-svid-ttl",
            "not a TTL: expected seconds (600) or a duration (90s, 5m, 8h)",
        ],
    );
    assert!(!abc.contains("expected number at"), "{abc}");
    usage_error(
        &create("--x509-svid-ttl", "-5"),
        &[
            "invalid value '-5' for '--x509-svid-ttl",
            "must be positive",
        ],
    );
    usage_error(
        &create("--jwt-svid-ttl", "0"),
        &["'--jwt-svid-ttl", "must be positive"],
    );
    usage_error(
        &create("--jwt-svid-ttl", "9999d"),
        &["'--jwt-svid-ttl", "maximum"],
    );
    usage_error(
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/n",
            "--ttl",
            "soon",
        ],
        &["invalid value 'soon' for '--ttl", "not a TTL"],
    );
    usage_error(
        &["node", "run", "--sync-interval", "-1s"],
        &["'--sync-interval", "must be positive"],
    );

    // A runtime error keeps exit 1 and one line.
    let out = agentd(&["entry", "show", "--admin-socket", "/nonexistent/admin.sock"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn entry_list_lists_entries_like_entry_show() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let a = server.create_entry(&[
        "--parent-id",
        "spiffe://example.org/node/n1",
        "--spiffe-id",
        "spiffe://example.org/agent/a",
        "--selector",
        "unix:uid:1",
    ])?;
    let b = server.create_entry(&[
        "--parent-id",
        "spiffe://example.org/node/n2",
        "--spiffe-id",
        "spiffe://example.org/agent/b",
        "--selector",
        "unix:uid:2",
    ])?;
    let ids = |args: &[&str]| -> anyhow::Result<Vec<String>> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&server.cli_ok(&all)?)?;
        let mut ids: Vec<String> = v
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("not an array: {v}"))?
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        Ok(ids)
    };
    let mut both = vec![a.clone(), b];
    both.sort();
    assert_eq!(ids(&["entry", "list"])?, both);
    assert_eq!(ids(&["entry", "list"])?, ids(&["entry", "show"])?);
    assert_eq!(
        ids(&[
            "entry",
            "list",
            "--parent-id",
            "spiffe://example.org/node/n1"
        ])?,
        vec![a]
    );
    let text = server.cli_ok(&["entry", "list"])?;
    assert!(text.starts_with("Found 2 entries"), "{text}");
    Ok(())
}

/// The option (and positional argument) lines of one `--help` text that have no
/// description, on the same line or (clap's layout for long lines) the next.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    let mut in_args = false;
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_args = *line == "Options:" || *line == "Arguments:";
            continue;
        }
        let item = line.trim_start();
        let indent = line.len() - item.len();
        if !in_args || item.is_empty() || indent > 6 {
            continue;
        }
        // "--flag <VALUE>  Description": the spec has single spaces only. clap's own
        // "[default: ...]" or "[possible values: ...]" alone is no description.
        let described = |d: &str| !d.trim().is_empty() && !d.trim_start().starts_with('[');
        let same_line = item.split_once("  ").is_some_and(|(_, d)| described(d));
        let next_line = lines.get(i + 1).is_some_and(|next| {
            let t = next.trim_start();
            next.len() - t.len() > 6 && described(t)
        });
        if !same_line && !next_line {
            missing.push(item.trim_end().to_string());
        }
    }
    missing
}

/// The subcommands a `--help` text lists, without `help`.
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_commands = line == "Commands:";
            continue;
        }
        if in_commands {
            if let Some(name) = line.split_whitespace().next() {
                if name != "help" {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn every_option_of_every_command_has_a_description() {
    let mut missing = Vec::new();
    let mut visited = 0;
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = agentd(&args);
        assert!(out.status.success(), "agentd {args:?}");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        visited += 1;
        for item in undescribed(&help) {
            missing.push(format!("agentd {}: {item}", path.join(" ")));
        }
        for sub in subcommands(&help) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
    }
    // The walk reached the leaves (server run, entry create, api fetch jwt, ...).
    assert!(visited > 50, "only {visited} commands walked");
    assert!(
        missing.is_empty(),
        "options without a description:\n{}",
        missing.join("\n")
    );
}

#[test]
fn help_shows_the_defaults_that_apply() -> anyhow::Result<()> {
    let help = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--help");
        String::from_utf8_lossy(&agentd(&all).stdout).into_owned()
    };
    let server = help(&["server", "run"]);
    for d in [
        "[default: example.org]",
        "[default: 0.0.0.0:8081]",
        "[default: /tmp/agentd-server/private/admin.sock]",
        "[default: /var/lib/agentd/server as root",
    ] {
        assert!(server.contains(d), "server run --help lacks {d}:\n{server}");
    }
    let node = help(&["node", "run"]);
    for d in [
        "[default: 127.0.0.1:8081]",
        "[default: /tmp/agentd-node/public/api.sock]",
        "[default: 5s]",
        "[default: /var/lib/agentd/node as root",
    ] {
        assert!(node.contains(d), "node run --help lacks {d}:\n{node}");
    }
    let create = help(&["entry", "create"]);
    for d in [
        "[default: the server's default_x509_svid_ttl",
        "[default: the server's default_jwt_svid_ttl",
    ] {
        assert!(
            create.contains(d),
            "entry create --help lacks {d}:\n{create}"
        );
    }

    // Shown, not applied: the config file still sets what the flags leave out.
    let env = Env::new();
    let cfg = env.path().join("server.toml");
    std::fs::write(&cfg, "trust_domain = \"corp.example\"\n")?;
    let server = Server::start_with(&env, &["--config", cfg.to_str().unwrap()])?;
    let info: serde_json::Value = serde_json::from_str(&agentd_e2e::agentd_ok(&[
        "healthcheck",
        "--admin-socket",
        server.admin_socket.to_str().unwrap(),
        "--output",
        "json",
    ])?)?;
    assert_eq!(info["trust_domain"], "corp.example");
    Ok(())
}

#[test]
fn a_second_server_on_the_same_data_dir_says_another_server_uses_it() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let data_dir = server.data_dir.display().to_string();
    let other_socket = env.path().join("other.sock").display().to_string();
    let log = env.path().join("second.log");
    let mut second = Daemon::spawn_args(
        &[
            "server",
            "run",
            "--data-dir",
            &data_dir,
            "--admin-socket",
            &other_socket,
            "--bind-address",
            "127.0.0.1:0",
        ],
        log,
    )?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    let text = second.log_text();
    assert!(!status.success(), "the second server started: {text}");
    assert!(
        text.contains("another server is using the data dir") && text.contains(&data_dir),
        "{text}"
    );
    assert!(!text.contains("WouldBlock"), "{text}");
    // The first one is unaffected.
    server.cli_ok(&["entry", "show"])?;
    Ok(())
}

#[test]
fn a_second_daemon_on_a_live_socket_refuses_to_start_and_leaves_it_alone() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    // Another server: its own data dir and port, the same admin socket.
    let admin_socket = server.admin_socket.display().to_string();
    let other_dir = env.path().join("other-server").display().to_string();
    let mut second = Daemon::spawn_args(
        &[
            "server",
            "run",
            "--data-dir",
            &other_dir,
            "--admin-socket",
            &admin_socket,
            "--bind-address",
            "127.0.0.1:0",
        ],
        env.path().join("second-server.log"),
    )?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    let text = second.log_text();
    assert!(!status.success(), "the second server started: {text}");
    assert!(
        text.contains("admin socket") && text.contains("another process is serving"),
        "{text}"
    );
    // The first server still answers on its socket, after the second one exited.
    server.cli_ok(&["entry", "show"])?;

    // Another node agent on the same Workload API socket.
    let other_node_dir = env.path().join("other-node");
    let mut second = agentd_e2e::spawn_node(
        &server.address,
        &node.bundle,
        &other_node_dir,
        &node.socket,
        Some(&server.join_token("spiffe://example.org/node/other")?),
    )?;
    let status = second.wait_exit(Duration::from_secs(30))?;
    let text = second.log_text();
    assert!(!status.success(), "the second node agent started: {text}");
    assert!(
        text.contains("workload API socket") && text.contains("another process is serving"),
        "{text}"
    );
    let sock = node.socket_arg();
    let health = agentd(&["healthcheck", "--socket-path", &sock]);
    assert!(
        health.status.success(),
        "the first node agent lost its socket: {}",
        String::from_utf8_lossy(&health.stderr)
    );
    Ok(())
}

#[test]
fn entry_create_warns_when_no_node_has_the_parent_id() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let create = |parent: &str, id: &str, selector: &str, json: bool| {
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            id,
            "--selector",
            selector,
        ];
        if json {
            args.extend(["--output", "json"]);
        }
        let out = server.cli(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An attested node: no warning.
    let (_, stderr) = create(
        &node.spiffe_id,
        "spiffe://example.org/agent/a",
        "unix:uid:1",
        false,
    );
    assert!(stderr.is_empty(), "{stderr}");
    // No such node yet: accepted (pre-registration), with a warning naming the parent.
    let later = "spiffe://example.org/node/later";
    let (stdout, stderr) = create(later, "spiffe://example.org/agent/b", "unix:uid:1", false);
    let id = stdout.trim();
    assert_eq!(stdout, format!("{id}\n"), "stdout is the id alone");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("warning: ") && stderr.contains(later),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (stdout, stderr) = create(later, "spiffe://example.org/agent/c", "unix:uid:1", true);
    let v: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(v["parent_id"], later);
    assert!(stderr.contains(later), "{stderr}");
    // A node-set alias (parented to the server) and an entry under it: no warning.
    let (_, stderr) = create(
        "spiffe://example.org/agentd/server",
        "spiffe://example.org/nodes/web",
        "x509pop:subject:cn:web",
        false,
    );
    assert!(stderr.is_empty(), "{stderr}");
    let (_, stderr) = create(
        "spiffe://example.org/nodes/web",
        "spiffe://example.org/agent/d",
        "unix:uid:1",
        false,
    );
    assert!(stderr.is_empty(), "{stderr}");
    Ok(())
}

#[test]
fn api_selectors_says_why_there_is_no_sha256_selector() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let cfg = env.path().join("node.toml");
    std::fs::write(
        &cfg,
        "[workload_attestors.unix]\nmax_binary_size = \"1KiB\"\n",
    )?;
    let node = Node::start_with(&env, &server, "n1", &["--config", cfg.to_str().unwrap()])?;
    let sock = node.socket_arg();
    let out = agentd(&["api", "selectors", "--socket-path", &sock]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("unix:uid:") && !stdout.contains("unix:sha256"),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("note: no unix:sha256 selector: the binary is ")
            && stderr.contains("more than max_binary_size (1024 bytes)"),
        "{stderr}"
    );
    let out = agentd(&[
        "api",
        "selectors",
        "--socket-path",
        &sock,
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let notes = v["notes"].as_array().cloned().unwrap_or_default();
    assert_eq!(notes.len(), 1, "{v}");
    assert!(
        notes[0]
            .as_str()
            .unwrap_or_default()
            .contains("max_binary_size"),
        "{v}"
    );
    Ok(())
}

/// `agentd-node` has the node agent's commands only, and the linker left the server out of
/// it: its PostgreSQL schema, which `agentd` carries, is not in the node-only binary.
#[test]
fn the_node_only_build_has_node_commands_and_no_server_code() -> anyhow::Result<()> {
    let out = std::process::Command::new(agentd_node_bin())
        .args(["server", "run"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("'server'"), "names the command: {stderr}");

    let help = std::process::Command::new(agentd_node_bin())
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("run") && help.contains("healthcheck"),
        "{help}"
    );

    // A server-only string: the store's schema (datastore/pg_store.rs).
    let marker: &[u8] = b"CREATE TABLE join_tokens";
    let contains = |bin: &std::path::Path| -> anyhow::Result<bool> {
        let bytes = std::fs::read(bin)?;
        Ok(bytes.windows(marker.len()).any(|w| w == marker))
    };
    assert!(
        contains(&agentd_bin())?,
        "agentd carries the server's schema"
    );
    assert!(
        !contains(&agentd_node_bin())?,
        "agentd-node must not link the server's store"
    );
    Ok(())
}
