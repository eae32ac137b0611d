//! `server run` and `node run`: config file, flags on top, logging, signals.

use std::sync::Arc;

use anyhow::anyhow;
use tokio_util::sync::CancellationToken;

use super::{LogArgs, LogFormat, NodeRunArgs, ServerMigrateArgs, ServerRunArgs};
use crate::clock::SystemClock;
use crate::config::read_toml;
use crate::node::{NodeAgent, NodeConfig, RawNodeConfig};
use crate::server::{RawServerConfig, Server, ServerConfig};

fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain `key=value` fields.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match args.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// `agentd server migrate`: the embedded store of a stopped server into an empty
/// PostgreSQL database, in one transaction (docs/ha.md, "Moving a server onto PostgreSQL").
/// Nothing is deleted: the embedded store stays in the data dir.
pub async fn server_migrate(args: ServerMigrateArgs, out: super::Output) -> anyhow::Result<()> {
    use crate::datastore::migrate::StoreCopy;
    use crate::datastore::{DataStoreError, PgStore, SledStore};
    init_logging(&args.log);
    let url = zeroize::Zeroizing::new(args.to);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(anyhow!(
            "--to: {} is not a postgres:// URL",
            crate::datastore::pg_store::without_password(&url)
        ));
    }
    let embedded = args.data_dir.join("datastore");
    if !embedded.is_dir() {
        return Err(anyhow!(
            "--data-dir: {} holds no embedded store (no datastore directory)",
            args.data_dir.display()
        ));
    }
    let source = SledStore::open(&embedded).map_err(|e| match e {
        DataStoreError::InUse { .. } => anyhow!(
            "--data-dir: {} is in use by a running server: stop it first, so that nothing is written during the copy",
            args.data_dir.display()
        ),
        other => anyhow!("--data-dir: {}: {other}", embedded.display()),
    })?;
    let target = PgStore::open(&url)
        .await
        .map_err(|e| anyhow!("--to: {e}"))?;
    if !target.is_empty().await.map_err(|e| anyhow!("--to: {e}"))? {
        return Err(anyhow!(
            "--to: the database {} already holds records: a migration fills an empty database only (nothing was written)",
            target.shown()
        ));
    }
    let now = crate::clock::unix_seconds(std::time::SystemTime::now());
    let copy = StoreCopy::read(&source, now)
        .await
        .map_err(|e| anyhow!("reading {}: {e}", embedded.display()))?;
    target
        .import(&copy)
        .await
        .map_err(|e| anyhow!("writing {} (nothing was written): {e}", target.shown()))?;
    out.print(
        &serde_json::json!({
            "database": target.shown(),
            "entries": copy.entries.len(),
            "nodes": copy.nodes.len(),
            "issued": copy.issued.len(),
            "revocations": copy.revocations.len(),
            "revocation_head": copy.revocation_head,
            "audit_records": copy.audit.len(),
            "grants": copy.grants.len(),
            "owners": copy.owners.len(),
            "used_token_ids": copy.seen_tokens.len(),
        }),
        || {
            format!(
                "copied to {}: {} entries, {} nodes, {} live SVID records, {} revocation events (head {}), {} audit records, {} grants, {} owners, {} used platform token ids\nnext: start the server on the same data dir (its CA and audit keys stay there) with --datastore and the same URL; the embedded store in {} is kept, remove it once the server runs on PostgreSQL\n",
                target.shown(),
                copy.entries.len(),
                copy.nodes.len(),
                copy.issued.len(),
                copy.revocations.len(),
                copy.revocation_head,
                copy.audit.len(),
                copy.grants.len(),
                copy.owners.len(),
                copy.seen_tokens.len(),
                embedded.display()
            )
        },
    );
    Ok(())
}

pub async fn server_run(args: ServerRunArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let mut raw: RawServerConfig = match &args.config {
        Some(p) => read_toml(p)?,
        None => RawServerConfig::default(),
    };
    if let Some(v) = args.trust_domain {
        raw.trust_domain = Some(v);
    }
    if let Some(v) = args.data_dir {
        raw.data_dir = Some(v);
    }
    if let Some(v) = args.bind_address {
        raw.bind_address = Some(v);
    }
    if let Some(v) = args.admin_socket {
        raw.admin_socket = Some(v);
    }
    if let Some(v) = args.metrics_address {
        raw.metrics_address = Some(v);
    }
    if let Some(addr) = args.federation_bind_address {
        raw.federation
            .get_or_insert_with(Default::default)
            .bind_address = Some(addr);
    }
    if let Some(addr) = args.oauth_bind_address {
        raw.oauth.get_or_insert_with(Default::default).bind_address = Some(addr);
    }
    if let Some(issuer) = args.oauth_issuer {
        raw.oauth.get_or_insert_with(Default::default).issuer = Some(issuer);
    }
    if let Some(url) = args.datastore {
        raw.datastore.get_or_insert_with(Default::default).url = Some(url);
    }
    let config = ServerConfig::try_from(raw)?;
    Server::new(config, Arc::new(SystemClock))
        .run(shutdown_on_signals())
        .await
        .map_err(|e| anyhow!("server: {e}"))
}

pub async fn node_run(args: NodeRunArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let mut raw: RawNodeConfig = match &args.config {
        Some(p) => read_toml(p)?,
        None => RawNodeConfig::default(),
    };
    if !args.server_address.is_empty() {
        // The flags replace the file's addresses.
        raw.server_address = Some(args.server_address.join(","));
        raw.server_addresses = None;
    }
    if let Some(v) = args.join_token {
        raw.join_token = Some(v);
    }
    if let (Some(cert), Some(key)) = (args.x509pop_cert, args.x509pop_key) {
        let a = raw.node_attestor.get_or_insert_with(Default::default);
        a.x509pop = Some(crate::node::config::RawNodeX509Pop {
            cert_file: Some(cert),
            key_file: Some(key),
        });
    }
    if let Some(token_file) = args.claims_token_file {
        let a = raw.node_attestor.get_or_insert_with(Default::default);
        a.claims = Some(crate::node::config::RawNodeClaims {
            token_file: Some(token_file),
        });
    }
    if let Some(v) = args.trust_bundle {
        raw.trust_bundle = Some(v);
        raw.insecure_bootstrap = Some(false);
    }
    if args.insecure_bootstrap {
        raw.insecure_bootstrap = Some(true);
        raw.trust_bundle = None;
    }
    if let Some(v) = args.socket_path {
        raw.socket_path = Some(v);
    }
    if let Some(v) = args.data_dir {
        raw.data_dir = Some(v);
    }
    if let Some(n) = args.svid_prefetch {
        raw.svid_prefetch = Some(n);
    }
    if let Some(v) = args.sync_interval {
        raw.sync_interval = Some(v.to_string());
    }
    if let Some(v) = args.metrics_address {
        raw.metrics_address = Some(v);
    }
    let config = NodeConfig::try_from(raw)?;
    NodeAgent::new(config, Arc::new(SystemClock))
        .run(shutdown_on_signals())
        .await
        .map_err(|e| anyhow!("node agent: {e}"))
}
