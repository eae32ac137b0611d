//! Conversions between domain types and their protobuf forms, shared by both ends.

use std::time::Duration;

use agentd_proto::node as pb;
use spiffe::TrustDomain;

use crate::bundle::{Bundle, JwtAuthority};
use crate::clock::{from_unix_seconds, unix_seconds};

pub fn bundle_to_proto(b: &Bundle) -> pb::Bundle {
    pb::Bundle {
        trust_domain: b.trust_domain.as_str().to_string(),
        x509_authorities: b.x509_authorities.clone(),
        jwt_authorities: b
            .jwt_authorities
            .iter()
            .map(|a| pb::JwtAuthority {
                key_id: a.key_id.clone(),
                public_key: a.public_key_spki_der.clone(),
                expires_at: unix_seconds(a.expires_at),
            })
            .collect(),
        sequence: b.sequence,
        refresh_hint_seconds: i64::try_from(b.refresh_hint.as_secs()).unwrap_or(i64::MAX),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
}

pub fn bundle_from_proto(p: &pb::Bundle) -> Result<Bundle, ConvertError> {
    if p.x509_authorities.is_empty() {
        return Err(ConvertError::Field {
            field: "bundle.x509_authorities",
            reason: "empty".into(),
        });
    }
    any_bundle_from_proto(p)
}

/// Another trust domain's bundle: X.509 or JWT authorities, at least one key of either kind
/// (a federated trust domain may publish JWT keys only).
pub fn federated_bundle_from_proto(p: &pb::Bundle) -> Result<Bundle, ConvertError> {
    if p.x509_authorities.is_empty() && p.jwt_authorities.is_empty() {
        return Err(ConvertError::Field {
            field: "federated_bundles",
            reason: format!("the bundle of {} holds no keys", p.trust_domain),
        });
    }
    any_bundle_from_proto(p)
}

fn any_bundle_from_proto(p: &pb::Bundle) -> Result<Bundle, ConvertError> {
    let trust_domain = TrustDomain::new(&p.trust_domain).map_err(|e| ConvertError::Field {
        field: "bundle.trust_domain",
        reason: e.to_string(),
    })?;
    Ok(Bundle {
        trust_domain,
        x509_authorities: p.x509_authorities.clone(),
        jwt_authorities: p
            .jwt_authorities
            .iter()
            .map(|a| JwtAuthority {
                key_id: a.key_id.clone(),
                public_key_spki_der: a.public_key.clone(),
                expires_at: from_unix_seconds(a.expires_at),
            })
            .collect(),
        sequence: p.sequence,
        refresh_hint: Duration::from_secs(p.refresh_hint_seconds.max(0).unsigned_abs()),
    })
}
