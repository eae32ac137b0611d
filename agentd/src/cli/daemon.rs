//! `server run` and `node run`: config file, flags on top, logging, signals.

use std::sync::Arc;

use anyhow::anyhow;
use tokio_util::sync::CancellationToken;

use super::{LogArgs, LogFormat, NodeRunArgs, ServerRunArgs};
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
