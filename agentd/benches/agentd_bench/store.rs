//! (g) The PostgreSQL store beside sled, in the same run: the node API mint rate of (b) and
//! the revocation latency of (e) (one node agent) against an in-process server on a fresh
//! PostgreSQL database, next to the sled figures of the same run, and their ratios.

use std::path::Path;

use anyhow::{anyhow, Context};

use crate::harness::{start_server_on, NodeEnv};
use crate::node_api::bench_node_api;
use crate::output::{per_sec, row};
use crate::revocation::{bench_revocation, RevocationFigures};
use crate::TRUST_DOMAIN;

/// A fresh database on the bench's PostgreSQL, dropped with this value.
struct BenchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    async fn create() -> anyhow::Result<Self> {
        let admin_url = std::env::var("AGENTD_BENCH_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("agentd_bench_{:016x}", rand::random::<u64>());
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .map_err(|e| {
                anyhow!(
                    "(g) needs PostgreSQL at {admin_url} ({e}): `make bench` starts one (scripts/install-tools.sh), or set AGENTD_BENCH_POSTGRES"
                )
            })?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("(g) creating the bench database")?;
        let (base, _) = admin_url
            .rsplit_once('/')
            .ok_or_else(|| anyhow!("AGENTD_BENCH_POSTGRES must end in /DATABASE"))?;
        let url = format!("{base}/{name}");
        Ok(Self {
            admin_url,
            name,
            url,
        })
    }

    async fn drop_database(self) -> anyhow::Result<()> {
        let (client, conn) =
            tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

/// Mint rate and revocation latency against a fresh server in `dir` on `datastore` (None:
/// the embedded store).
async fn measure(
    dir: &Path,
    datastore: Option<String>,
) -> anyhow::Result<(f64, RevocationFigures)> {
    std::fs::create_dir_all(dir)?;
    let (server, mut admin) = start_server_on(dir, None, datastore).await?;
    let (address, bundle) = crate::harness::address_and_bundle(&mut admin).await?;
    let mint = bench_node_api(&mut admin, &address, &bundle.x509_authorities, 1).await?;
    let bundle_file = dir.join("bundle.pem");
    std::fs::write(&bundle_file, &bundle.pem)?;
    let env = NodeEnv {
        dir,
        address: &address,
        bundle_file: &bundle_file,
    };
    let name = "bench-revocation-store";
    let (mut node, socket) = env.start_node(&mut admin, name).await?;
    let parent = format!("spiffe://{TRUST_DOMAIN}/node/{name}");
    let revocation =
        bench_revocation(&mut node, &socket, &mut admin, &parent, "bench/store").await?;
    node.check_alive()?;
    drop(node);
    server.shutdown().await?;
    Ok((mint, revocation))
}

/// (g) with the sled figures measured earlier in this run.
pub async fn run(
    dir: &Path,
    sled_mint: f64,
    sled_revocation: &RevocationFigures,
) -> anyhow::Result<()> {
    let db = BenchDatabase::create().await?;
    let measured = measure(&dir.join("store-postgres"), Some(db.url.clone())).await;
    db.drop_database().await?;
    let (pg_mint, pg_revocation) = measured?;
    print_rows(sled_mint, sled_revocation, pg_mint, &pg_revocation);
    Ok(())
}

/// (g) alone (`AGENTD_BENCH_ONLY=store`): sled, then PostgreSQL, in this run.
pub async fn run_alone(dir: &Path) -> anyhow::Result<()> {
    let (sled_mint, sled_revocation) = measure(&dir.join("store-sled"), None).await?;
    run(dir, sled_mint, &sled_revocation).await
}

fn print_rows(sled_mint: f64, sled: &RevocationFigures, pg_mint: f64, pg: &RevocationFigures) {
    row(
        "(g) node API mint, PostgreSQL store",
        per_sec(pg_mint, "SVIDs"),
        "",
        None,
    );
    row(
        "(g) node API mint, sled store (b)",
        per_sec(sled_mint, "SVIDs"),
        "",
        None,
    );
    row(
        "(g) ratio mint PostgreSQL / sled",
        format!("{:.2}", pg_mint / sled_mint),
        "",
        None,
    );
    for (label, (l, whole50, whole99)) in [("PostgreSQL", pg), ("sled", sled)] {
        row(
            &format!("(g) revoke -> stream update, {label}: p50"),
            format!("{:.1} ms", l.p50),
            "",
            None,
        );
        row(
            &format!("(g) revoke -> stream update, {label}: p99"),
            format!("{:.1} ms", l.p99),
            "",
            None,
        );
        row(
            &format!("(g) revoke call start -> update, {label}: p50"),
            format!("{whole50:.1} ms"),
            "",
            None,
        );
        row(
            &format!("(g) revoke call start -> update, {label}: p99"),
            format!("{whole99:.1} ms"),
            "",
            None,
        );
    }
    row(
        "(g) ratio revoke call -> update p50, PostgreSQL / sled",
        format!("{:.2}", pg.1 / sled.1.max(0.001)),
        "",
        None,
    );
}
