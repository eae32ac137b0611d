//! `agentd federation create|list|show|update|delete` and `agentd bundle set|list|delete`.

use std::io::Read as _;
use std::path::Path;

use agentd_proto::admin as pb;
use anyhow::{anyhow, Context as _};
use serde_json::json;

use super::connect::{admin_client, status};
use super::output::rfc3339;
use super::{BundleCommand, BundleFormat, FederationArgs, FederationCommand, Output};

/// Most bytes read from a bundle file: a little over what the server accepts, so that it
/// is the server that names the limit.
const MAX_BUNDLE_FILE: u64 = 1024 * 1024;

fn format_name(f: BundleFormat) -> &'static str {
    match f {
        BundleFormat::Pem => "pem",
        BundleFormat::Spiffe => "spiffe",
    }
}

/// Reads a bundle file, or stdin for `-`.
fn read_bundle(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_BUNDLE_FILE)
            .read_to_end(&mut data)
            .with_context(|| format!("{flag}: reading stdin"))?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_BUNDLE_FILE).read_to_end(&mut data))
            .map_err(|e| anyhow!("{flag}: {}: {e}", path.display()))?;
    }
    Ok(data)
}

fn bundle_json(b: &pb::FederatedBundle) -> serde_json::Value {
    json!({
        "trust_domain": b.trust_domain,
        "x509_authorities": b.x509_authorities.len(),
        "jwt_authorities": b.jwt_authorities,
        "sequence": b.sequence,
        "refresh_hint": b.refresh_hint_seconds,
        "updated_at": b.updated_at,
        "source": b.source,
        "pem": b.pem,
        "spiffe": serde_json::from_str::<serde_json::Value>(&b.spiffe_json).unwrap_or_default(),
    })
}

fn bundle_text(b: &pb::FederatedBundle) -> String {
    format!(
        "Trust domain     : {}\nX.509 authorities: {}\nJWT authorities  : {}\nSequence         : {}\nRefresh hint     : {}s\nUpdated at       : {}\nSource           : {}\n",
        b.trust_domain,
        b.x509_authorities.len(),
        b.jwt_authorities,
        b.sequence,
        b.refresh_hint_seconds,
        rfc3339(b.updated_at),
        b.source
    )
}

fn federation_json(f: &pb::Federation) -> serde_json::Value {
    json!({
        "trust_domain": f.trust_domain,
        "bundle_endpoint_url": f.bundle_endpoint_url,
        "bundle_endpoint_profile": f.bundle_endpoint_profile,
        "endpoint_spiffe_id": (!f.endpoint_spiffe_id.is_empty()).then_some(&f.endpoint_spiffe_id),
        "created_at": f.created_at,
        "updated_at": f.updated_at,
        "bundle": f.bundle.as_ref().map(bundle_json),
        "last_attempt_at": (f.last_attempt_at != 0).then_some(f.last_attempt_at),
        "last_error": (!f.last_error.is_empty()).then_some(&f.last_error),
        "next_refresh_at": (f.next_refresh_at != 0).then_some(f.next_refresh_at),
    })
}

fn federation_text(f: &pb::Federation) -> String {
    let mut s = format!(
        "Trust domain       : {}\nBundle endpoint URL: {}\nProfile            : {}\n",
        f.trust_domain, f.bundle_endpoint_url, f.bundle_endpoint_profile
    );
    if !f.endpoint_spiffe_id.is_empty() {
        s += &format!("Endpoint SPIFFE ID : {}\n", f.endpoint_spiffe_id);
    }
    match &f.bundle {
        Some(b) => {
            s += &format!(
                "Bundle             : sequence {}, {} X.509 and {} JWT authorities ({}, {})\n",
                b.sequence,
                b.x509_authorities.len(),
                b.jwt_authorities,
                b.source,
                rfc3339(b.updated_at)
            )
        }
        None => s += "Bundle             : none yet\n",
    }
    if f.last_attempt_at != 0 {
        s += &format!(
            "Last fetch         : {} ({})\n",
            rfc3339(f.last_attempt_at),
            if f.last_error.is_empty() {
                "ok"
            } else {
                &f.last_error
            }
        );
    }
    if f.next_refresh_at != 0 {
        s += &format!("Next fetch         : {}\n", rfc3339(f.next_refresh_at));
    }
    s
}

fn trust_bundle(args: &FederationArgs) -> anyhow::Result<(Vec<u8>, String)> {
    match &args.trust_bundle {
        None => Ok((Vec::new(), String::new())),
        Some(p) => Ok((
            read_bundle("--trust-bundle", p)?,
            format_name(args.trust_bundle_format).to_string(),
        )),
    }
}

pub async fn federation(cmd: FederationCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        FederationCommand::Create { args, admin } => {
            let (trust_bundle, trust_bundle_format) = trust_bundle(&args)?;
            let f = admin_client(&admin.admin_socket)
                .await?
                .create_federation(pb::FederationSpec {
                    trust_domain: args.trust_domain,
                    bundle_endpoint_url: args.bundle_endpoint_url.unwrap_or_default(),
                    bundle_endpoint_profile: args
                        .bundle_endpoint_profile
                        .map(|p| p.name().to_string())
                        .unwrap_or_default(),
                    endpoint_spiffe_id: args.endpoint_spiffe_id.unwrap_or_default(),
                    trust_bundle,
                    trust_bundle_format,
                })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&federation_json(&f), || federation_text(&f));
        }
        FederationCommand::List { admin } => {
            let all = admin_client(&admin.admin_socket)
                .await?
                .list_federations(pb::ListFederationsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .federations;
            out.print_list(
                "federation relationships",
                &all,
                federation_json,
                federation_text,
            );
        }
        FederationCommand::Show {
            trust_domain,
            admin,
        } => {
            let f = admin_client(&admin.admin_socket)
                .await?
                .get_federation(pb::GetFederationRequest { trust_domain })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&federation_json(&f), || federation_text(&f));
        }
        FederationCommand::Update { args, admin } => {
            let (trust_bundle, trust_bundle_format) = trust_bundle(&args)?;
            let f = admin_client(&admin.admin_socket)
                .await?
                .update_federation(pb::UpdateFederationRequest {
                    trust_domain: args.trust_domain,
                    bundle_endpoint_url: args.bundle_endpoint_url,
                    bundle_endpoint_profile: args
                        .bundle_endpoint_profile
                        .map(|p| p.name().to_string()),
                    endpoint_spiffe_id: args.endpoint_spiffe_id,
                    trust_bundle,
                    trust_bundle_format,
                })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&federation_json(&f), || federation_text(&f));
        }
        FederationCommand::Delete {
            trust_domain,
            admin,
        } => {
            let f = admin_client(&admin.admin_socket)
                .await?
                .delete_federation(pb::DeleteFederationRequest { trust_domain })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&federation_json(&f), || {
                format!(
                    "Deleted the federation relationship with {} (its bundle is kept; `agentd bundle delete` removes it)",
                    f.trust_domain
                )
            });
        }
    }
    Ok(())
}

pub async fn bundle(cmd: BundleCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Set {
            trust_domain,
            format,
            path,
            admin,
        } => {
            let data = read_bundle("--path", &path)?;
            let b = admin_client(&admin.admin_socket)
                .await?
                .set_federated_bundle(pb::SetFederatedBundleRequest {
                    trust_domain,
                    format: format_name(format).to_string(),
                    data,
                })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&bundle_json(&b), || bundle_text(&b));
        }
        BundleCommand::List { admin } => {
            let all = admin_client(&admin.admin_socket)
                .await?
                .list_federated_bundles(pb::ListFederatedBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .bundles;
            out.print_list("federated bundles", &all, bundle_json, bundle_text);
        }
        BundleCommand::Delete {
            trust_domain,
            admin,
        } => {
            let b = admin_client(&admin.admin_socket)
                .await?
                .delete_federated_bundle(pb::DeleteFederatedBundleRequest { trust_domain })
                .await
                .map_err(status)?
                .into_inner();
            out.print(&bundle_json(&b), || {
                format!("Deleted the bundle of {}", b.trust_domain)
            });
        }
        other => return Err(anyhow!("not a federated bundle command: {other:?}")),
    }
    Ok(())
}
