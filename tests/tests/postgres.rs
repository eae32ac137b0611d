//! The server on the PostgreSQL datastore (`--datastore postgres://...`): entries, node
//! attestation, issuance, revocation and the audit log live in the database, survive a
//! restart, and nothing is written to an embedded store in the data dir. Each test makes its
//! own database on the local PostgreSQL (scripts/install-tools.sh starts one) and drops it.

use std::time::Duration;

use agentd_e2e::{wait_until, Env, Node, Server};

fn admin_url() -> String {
    std::env::var("AGENTD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// HOST:PORT of the test PostgreSQL (from its URL).
fn db_address() -> String {
    let url = admin_url();
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
    after_at
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_string()
}

/// A fresh database, dropped when the test ends.
struct Database {
    url: String,
    name: String,
    rt: tokio::runtime::Runtime,
}

impl Database {
    fn create() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let admin = admin_url();
        let name = format!("agentd_e2e_{:016x}", rand::random::<u64>());
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .map_err(|e| {
                    let why = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
                    anyhow::anyhow!(
                        "no test connection to PostgreSQL at {admin} ({why}): these tests need a running server that lets postgres in from 127.0.0.1; scripts/install-tools.sh (run by make test and .ci/run) installs and starts one, or set AGENTD_TEST_POSTGRES"
                    )
                })?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            anyhow::Ok(())
        })?;
        let (base, _) = admin
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("AGENTD_TEST_POSTGRES must end in /DATABASE"))?;
        Ok(Self {
            url: format!("{base}/{name}"),
            name,
            rt,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = self.rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .ok()
        });
    }
}

#[test]
fn a_server_on_postgres_issues_revokes_and_keeps_everything_across_a_restart() -> anyhow::Result<()>
{
    let db = Database::create()?;
    let env = Env::new();
    let mut server = Server::start_with(&env, &["--datastore", &db.url])?;
    let node = Node::start(&env, &server, "n1")?;
    let kept = "spiffe://example.org/pg/kept";
    let revoked = "spiffe://example.org/pg/revoked";
    server.register_own_uid(&node.spiffe_id, kept, &["--hint", "kept"])?;
    let revoked_id = server.register_own_uid(&node.spiffe_id, revoked, &["--hint", "revoked"])?;
    node.wait_for_svid(kept)?;
    node.wait_for_svid(revoked)?;
    server.cli_ok(&[
        "revoke",
        "entry",
        "--id",
        &revoked_id,
        "--reason",
        "postgres test",
    ])?;
    let gone = wait_until(Duration::from_secs(10), || {
        !String::from_utf8_lossy(&node.fetch_x509().stdout).contains(revoked)
    });
    assert!(gone, "the revoked SVID is still served");
    assert!(
        !server.data_dir.join("datastore").exists(),
        "an embedded store was made in the data dir"
    );

    // Everything is in the database: a restart (same data dir for the CA keys) sees it.
    server.restart()?;
    let entries: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
    let ids: Vec<&str> = entries
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["spiffe_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [kept, revoked]);
    let listed: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["revoke", "list", "--output", "json"])?)?;
    assert!(listed.to_string().contains(&revoked_id), "{listed}");
    let nodes = server.cli_ok(&["node", "list"])?;
    assert!(nodes.contains(&node.spiffe_id), "{nodes}");
    let verify: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["audit", "verify", "--output", "json"])?)?;
    assert_eq!(verify["intact"], true, "{verify}");
    assert!(verify["head_seq"].as_u64().unwrap_or(0) > 3, "{verify}");
    // The node agent carries on against the restarted server.
    node.wait_for_svid(kept)?;
    Ok(())
}

#[test]
fn a_bad_datastore_url_is_refused_naming_the_field() {
    let env = Env::new();
    let out = agentd_e2e::agentd(&[
        "server",
        "run",
        "--data-dir",
        &env.path().join("server").display().to_string(),
        "--admin-socket",
        &env.path().join("admin.sock").display().to_string(),
        "--datastore",
        "mysql://root:hunter2@db/agentd",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("datastore.url"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was printed: {stderr}"
    );
}

/// A TCP relay to PostgreSQL that the test can cut (every connection closed, the port
/// refusing) and restore on the same port: the database going away, as the server sees it.
struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let relay = Self {
            port,
            cut: Default::default(),
            open: Default::default(),
        };
        relay.serve(listener);
        Ok(relay)
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let (cut, open) = (self.cut.clone(), self.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if cut.load(std::sync::atomic::Ordering::SeqCst) {
                    return; // the listener goes with this thread: the port refuses
                }
                let Ok(client) = client else { continue };
                let Ok(db) = std::net::TcpStream::connect(db_address()) else {
                    continue;
                };
                if let (Ok(c2), Ok(d2)) = (client.try_clone(), db.try_clone()) {
                    let mut held = open.lock().unwrap_or_else(|p| p.into_inner());
                    held.push(c2);
                    held.push(d2);
                }
                for (mut from, mut to) in [
                    (client.try_clone(), db.try_clone()),
                    (db.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// Closes every relayed connection and stops accepting.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so that it drops the listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        for s in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts again on the same port.
    fn restore(&self) -> anyhow::Result<()> {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.serve(listener);
        Ok(())
    }
}

/// While the database is unreachable the server is not ready and refuses writes with a clear
/// error, writing nothing; when it is back the server is ready and writes again, without a
/// restart.
#[test]
fn a_server_whose_database_goes_away_is_not_ready_refuses_writes_and_recovers() -> anyhow::Result<()>
{
    let db = Database::create()?;
    let relay = Relay::start()?;
    let (base, name) = db.url.rsplit_once('/').map_or(("", ""), |p| p);
    let host_end = base.rfind(':').unwrap_or(base.len());
    let url = format!("{}:{}/{name}", &base[..host_end], relay.port);
    let env = Env::new();
    let server = Server::start_with(
        &env,
        &["--datastore", &url, "--metrics-address", "127.0.0.1:0"],
    )?;
    let metrics = agentd_e2e::metrics_address(&server.daemon)?;
    let ready = || agentd_e2e::http_get(&metrics, "/ready").map(|(code, _)| code == 200);
    assert!(ready()?);
    let create = |path: &str| {
        server.cli(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/n1",
            "--spiffe-id",
            &format!("spiffe://example.org/db/{path}"),
            "--selector",
            "unix:uid:4242",
        ])
    };
    assert!(create("before").status.success());

    relay.cut();
    assert!(
        wait_until(Duration::from_secs(15), || ready().is_ok_and(|r| !r)),
        "/ready stayed 200 with the database gone"
    );
    let out = create("while-down");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("datastore is unreachable") && stderr.contains("nothing was written"),
        "{stderr}"
    );
    let health = server.cli(&["healthcheck"]);
    assert!(!health.status.success());
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("datastore_reachable"),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    relay.restore()?;
    assert!(
        wait_until(Duration::from_secs(20), || ready().unwrap_or(false)),
        "/ready did not come back with the database"
    );
    assert!(create("after").status.success());
    let listed: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])?)?;
    let ids: Vec<&str> = listed
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["spiffe_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/db/after",
            "spiffe://example.org/db/before"
        ]
    );
    Ok(())
}
