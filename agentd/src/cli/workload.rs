//! Workload API commands: talk to the node agent's socket like any workload would.

use std::path::Path;

use agentd_proto::workload as pb;
use anyhow::{anyhow, Context};
use futures::StreamExt;
use serde_json::json;

use super::connect::{
    health_client, revocations_client, selectors_client, status, workload_client,
};
use super::output::rfc3339;
use super::{ApiCommand, FetchCommand, Output, ValidateCommand};

struct CertInfo {
    serial: String,
    not_before: i64,
    not_after: i64,
}

fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(CertInfo {
        serial: c.tbs_certificate.serial.to_str_radix(16),
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
    })
}

/// Splits concatenated DER certificates.
pub fn split_der_certs(mut der: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("malformed certificate in response: {e}"))?;
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    Ok(out)
}

fn pem_certs(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| crate::keys::pem_encode("CERTIFICATE", d))
        .collect()
}

fn svid_json(s: &pb::X509svid) -> anyhow::Result<serde_json::Value> {
    let chain = split_der_certs(&s.x509_svid)?;
    let info = chain
        .first()
        .and_then(|c| cert_info(c))
        .ok_or_else(|| anyhow!("SVID without a certificate"))?;
    Ok(json!({
        "spiffe_id": s.spiffe_id,
        "hint": s.hint,
        "serial": info.serial,
        "not_before": info.not_before,
        "not_after": info.not_after,
        "chain_length": chain.len(),
    }))
}

fn svid_text(i: usize, s: &pb::X509svid) -> String {
    let chain = split_der_certs(&s.x509_svid).unwrap_or_default();
    let info = chain.first().and_then(|c| cert_info(c));
    let mut t = format!("SPIFFE ID     : {}\n", s.spiffe_id);
    if let Some(info) = info {
        t += &format!(
            "SVID serial   : {}\nValid after   : {}\nValid until   : {}\n",
            info.serial,
            rfc3339(info.not_before),
            rfc3339(info.not_after)
        );
    }
    if !s.hint.is_empty() {
        t += &format!("Hint          : {}\n", s.hint);
    }
    t += &format!("Index         : {i}\n");
    t
}

/// Writes `crl.pem` (every CA authority's CRL, PEM) beside the fetched bundles, from the node
/// agent's `agentd.workload.v1.Revocations/FetchCrls`.
async fn write_crls(dir: &Path, socket: &str) -> anyhow::Result<()> {
    let crls = revocations_client(socket)
        .await?
        .fetch_crls(agentd_proto::revocation::FetchCrlsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .crls;
    let pem: String = crls
        .iter()
        .map(|c| crate::keys::pem_encode("X509 CRL", &c.der))
        .collect();
    let p = dir.join("crl.pem");
    std::fs::write(&p, pem).with_context(|| format!("writing {}", p.display()))
}

fn write_svids(dir: &Path, resp: &pb::X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, s) in resp.svids.iter().enumerate() {
        let chain = split_der_certs(&s.x509_svid)?;
        let bundle = split_der_certs(&s.bundle)?;
        let write = |name: String, data: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))
        };
        write(format!("svid.{i}.pem"), pem_certs(&chain).as_bytes())?;
        write(format!("bundle.{i}.pem"), pem_certs(&bundle).as_bytes())?;
        let key = crate::keys::pem_encode_secret("PRIVATE KEY", &s.x509_svid_key);
        crate::keys::write_secret_file(&dir.join(format!("svid.{i}.key")), key.as_bytes())?;
    }
    Ok(())
}

pub async fn api(cmd: ApiCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 { write, crl, socket }) => {
            let mut stream = workload_client(&socket.socket_path)
                .await?
                .fetch_x509svid(pb::X509svidRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let resp = stream
                .next()
                .await
                .ok_or_else(|| anyhow!("the node agent closed the stream without an answer"))?
                .map_err(status)?;
            if let Some(dir) = &write {
                write_svids(dir, &resp)?;
                if crl {
                    write_crls(dir, &socket.socket_path).await?;
                }
            }
            let svids = resp
                .svids
                .iter()
                .map(svid_json)
                .collect::<anyhow::Result<Vec<_>>>()?;
            out.print(&json!({"svids": svids}), || {
                let mut t = format!("Received {} svid(s)\n", resp.svids.len());
                for (i, s) in resp.svids.iter().enumerate() {
                    t += "\n";
                    t += &svid_text(i, s);
                }
                if let Some(dir) = &write {
                    t += &format!("\nWritten to {}\n", dir.display());
                }
                t
            });
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            audience,
            grant: Some(grant),
            socket,
            ..
        }) => {
            return super::delegation::fetch_jwt(&socket.socket_path, grant, audience, out).await;
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            audience,
            spiffe_id,
            socket,
            grant: None,
        }) => {
            let resp = workload_client(&socket.socket_path)
                .await?
                .fetch_jwtsvid(pb::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            out.print(
                &json!({"svids": resp.svids.iter().map(|s| json!({"spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint})).collect::<Vec<_>>()}),
                || {
                    resp.svids
                        .iter()
                        .map(|s| format!("token({}):\n{}\n", s.spiffe_id, s.svid))
                        .collect()
                },
            );
        }
        ApiCommand::Validate(ValidateCommand::Jwt {
            audience,
            svid,
            socket,
        }) => {
            let resp = workload_client(&socket.socket_path)
                .await?
                .validate_jwtsvid(pb::ValidateJwtsvidRequest { audience, svid })
                .await
                .map_err(status)?
                .into_inner();
            let claims = resp
                .claims
                .map(|c| struct_to_json(&c))
                .unwrap_or(serde_json::Value::Null);
            out.print(
                &json!({"spiffe_id": resp.spiffe_id, "claims": claims}),
                || {
                    format!(
                        "SVID is valid.\nSPIFFE ID : {}\nClaims    : {claims}",
                        resp.spiffe_id
                    )
                },
            );
        }
        ApiCommand::Revocations {
            after,
            follow,
            socket,
        } => {
            let mut stream = revocations_client(&socket.socket_path)
                .await?
                .watch(agentd_proto::revocation::WatchRevocationsRequest {
                    after_sequence: after,
                })
                .await
                .map_err(status)?
                .into_inner();
            // Pages of the backlog (`more`) are printed as one, with split events whole.
            let mut parts = crate::revocation::feed::EventAssembler::default();
            let mut events = Vec::new();
            loop {
                let Some(msg) = stream.message().await.map_err(status)? else {
                    return Ok(());
                };
                events.extend(msg.events.into_iter().filter_map(|e| parts.push(e)));
                if msg.more || parts.is_pending() {
                    continue;
                }
                if follow && events.is_empty() {
                    continue; // a heartbeat
                }
                let shown = std::mem::take(&mut events);
                out.print(
                    &json!({
                        "head_sequence": msg.head_sequence,
                        "events": shown.iter().map(super::revoke::event_json).collect::<Vec<_>>(),
                    }),
                    || {
                        if shown.is_empty() {
                            return format!("no revocations (head {})", msg.head_sequence);
                        }
                        shown
                            .iter()
                            .map(|e| super::revoke::event_line(e) + "\n")
                            .collect()
                    },
                );
                if !follow {
                    return Ok(());
                }
            }
        }
        ApiCommand::Selectors(socket) => {
            let resp = selectors_client(&socket.socket_path)
                .await?
                .get_selectors(agentd_proto::agentd_workload::GetSelectorsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let selectors: Vec<String> = resp
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect();
            // Why a selector is missing goes to stderr in text (stdout keeps the selectors),
            // and into the one JSON value with --output json.
            if out == Output::Text {
                for note in &resp.notes {
                    eprintln!("note: {note}");
                }
            }
            out.print(
                &json!({"selectors": selectors, "spiffe_ids": resp.spiffe_ids, "notes": resp.notes}),
                || {
                    let mut t = String::from("Selectors of this process:\n");
                    for s in &selectors {
                        t += &format!("  {s}\n");
                    }
                    if resp.spiffe_ids.is_empty() {
                        t += "No entry matches them (no identity issued).\n";
                    } else {
                        t += "Matching identities:\n";
                        for id in &resp.spiffe_ids {
                            t += &format!("  {id}\n");
                        }
                    }
                    t
                },
            );
        }
        ApiCommand::Watch(socket) => {
            let mut stream = workload_client(&socket.socket_path)
                .await?
                .fetch_x509svid(pb::X509svidRequest {})
                .await
                .map_err(status)?
                .into_inner();
            while let Some(msg) = stream.next().await {
                let resp = msg.map_err(status)?;
                let svids = resp
                    .svids
                    .iter()
                    .map(svid_json)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                match out {
                    // One JSON value per update, one per line.
                    Output::Json => println!("{}", json!({"svids": svids})),
                    Output::Text => {
                        println!("Received {} svid(s)", resp.svids.len());
                        for (i, s) in resp.svids.iter().enumerate() {
                            print!("{}", svid_text(i, s));
                        }
                    }
                }
            }
            return Err(anyhow!("the node agent closed the stream"));
        }
        ApiCommand::Delegate {
            to,
            scopes,
            ttl,
            grant,
            socket,
        } => {
            return super::delegation::delegate(&socket.socket_path, to, scopes, ttl, grant, out)
                .await;
        }
        ApiCommand::Exchange { token, socket } => {
            return super::delegation::exchange(&socket.socket_path, token, out).await;
        }
    }
    Ok(())
}

fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                json!(*n as i64)
            } else {
                json!(n)
            }
        }
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub async fn healthcheck(raw: &str, out: Output) -> anyhow::Result<()> {
    let resp = health_client(raw)
        .await?
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let serving =
        resp.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    if !serving {
        return Err(anyhow!(
            "node agent is not ready (not yet attested and synced)"
        ));
    }
    out.print(&json!({"healthy": true}), || {
        "Node agent is healthy".to_string()
    });
    Ok(())
}
