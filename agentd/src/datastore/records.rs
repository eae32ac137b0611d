//! The JSON records a store keeps for each resource, and their checks on the way back in:
//! a stored record is parsed again when it is read, so a corrupt one is an error naming its
//! key and field, never a wrong answer. Backend-neutral: the sled store keeps these bytes
//! under its keys; another backend can keep the same documents.

use agentd_attestor::Selector;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use spiffe::SpiffeId;

use super::{AttestedNode, DataStoreError, Entry, EntrySpec, Grant, Result};
use super::{EntryActivity, LiveSvid};
use crate::delegation::{Delegation, Hop, ScopeSet};
use crate::model::federation::{
    BundleSource, EndpointProfile, FederatedBundle, FederationRelationship,
};
use crate::ttl::Ttl;
use spiffe::TrustDomain;

pub(super) fn backend(e: impl std::fmt::Display) -> DataStoreError {
    DataStoreError::Backend {
        reason: e.to_string(),
    }
}

pub(super) fn key_name(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

pub(super) fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| DataStoreError::Corrupt {
        key: key_name(key),
        reason: e.to_string(),
    })
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(backend)
}

pub(super) fn corrupt(key: &[u8], field: &str, reason: impl std::fmt::Display) -> DataStoreError {
    DataStoreError::Corrupt {
        key: key_name(key),
        reason: format!("{field}: {reason}"),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EntryRecord {
    pub(super) id: String,
    pub(super) spiffe_id: String,
    pub(super) parent_id: String,
    pub(super) selectors: Vec<String>,
    pub(super) x509_svid_ttl: u64,
    pub(super) jwt_svid_ttl: u64,
    pub(super) dns_names: Vec<String>,
    pub(super) hint: String,
    pub(super) scopes: Vec<String>,
    pub(super) owner: Option<String>,
    pub(super) revision: u64,
    pub(super) created_at: i64,
    /// Absent in records written before federation existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) federates_with: Vec<String>,
    /// Absent in records written before the OAuth front door existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) resources: Vec<String>,
}

impl EntryRecord {
    pub(super) fn from_entry(e: &Entry) -> Self {
        Self {
            id: e.id.to_string(),
            spiffe_id: e.spec.spiffe_id.to_string(),
            parent_id: e.spec.parent_id.to_string(),
            selectors: e.spec.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: e.spec.x509_svid_ttl.as_secs(),
            jwt_svid_ttl: e.spec.jwt_svid_ttl.as_secs(),
            dns_names: e.spec.dns_names.clone(),
            hint: e.spec.hint.clone(),
            scopes: e.spec.scopes.clone(),
            owner: e.spec.owner.clone(),
            revision: e.revision,
            created_at: e.created_at,
            federates_with: e
                .spec
                .federates_with
                .iter()
                .map(|td| td.as_str().to_string())
                .collect(),
            resources: e.spec.resources.iter().map(ToString::to_string).collect(),
        }
    }

    /// Stored records are parsed again on the way out: a corrupt record is an error, not a
    /// bad identity.
    pub(super) fn into_entry(self, key: &[u8]) -> Result<Entry> {
        let selectors = self
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| corrupt(key, "selectors", e))?;
        Ok(Entry {
            id: self.id.parse().map_err(|e| corrupt(key, "id", e))?,
            spec: EntrySpec {
                spiffe_id: SpiffeId::new(&self.spiffe_id)
                    .map_err(|e| corrupt(key, "spiffe_id", e))?,
                parent_id: SpiffeId::new(&self.parent_id)
                    .map_err(|e| corrupt(key, "parent_id", e))?,
                selectors,
                x509_svid_ttl: Ttl::from_secs(self.x509_svid_ttl)
                    .map_err(|e| corrupt(key, "x509_svid_ttl", e))?,
                jwt_svid_ttl: Ttl::from_secs(self.jwt_svid_ttl)
                    .map_err(|e| corrupt(key, "jwt_svid_ttl", e))?,
                dns_names: self.dns_names,
                hint: self.hint,
                scopes: self.scopes,
                owner: self.owner,
                federates_with: self
                    .federates_with
                    .iter()
                    .map(spiffe::TrustDomain::new)
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| corrupt(key, "federates_with", e))?,
                resources: crate::model::oauth::parse_prefixes(&self.resources)
                    .map_err(|e| corrupt(key, "resources", e))?,
            },
            revision: self.revision,
            created_at: self.created_at,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct NodeRecord {
    pub(super) spiffe_id: String,
    pub(super) attestation_type: String,
    pub(super) serial: String,
    pub(super) svid_expires_at: i64,
    pub(super) attested_at: i64,
    pub(super) last_seen_at: i64,
    /// Absent in records written before node selectors existed.
    #[serde(default)]
    pub(super) selectors: Vec<String>,
    #[serde(default)]
    pub(super) previous_serial: Option<String>,
    #[serde(default)]
    pub(super) previous_svid_expires_at: Option<i64>,
}

impl NodeRecord {
    pub(super) fn from_node(node: &AttestedNode) -> Self {
        Self {
            spiffe_id: node.spiffe_id.to_string(),
            attestation_type: node.attestation_type.clone(),
            serial: node.serial.clone(),
            svid_expires_at: node.svid_expires_at,
            attested_at: node.attested_at,
            last_seen_at: node.last_seen_at,
            selectors: node.selectors.iter().map(ToString::to_string).collect(),
            previous_serial: node.previous_serial.clone(),
            previous_svid_expires_at: node.previous_svid_expires_at,
        }
    }

    pub(super) fn into_node(self, key: &[u8]) -> Result<AttestedNode> {
        Ok(AttestedNode {
            spiffe_id: SpiffeId::new(&self.spiffe_id).map_err(|e| corrupt(key, "spiffe_id", e))?,
            attestation_type: self.attestation_type,
            serial: self.serial,
            svid_expires_at: self.svid_expires_at,
            attested_at: self.attested_at,
            last_seen_at: self.last_seen_at,
            selectors: self
                .selectors
                .iter()
                .map(|s| s.parse().map_err(|e| corrupt(key, "selectors", e)))
                .collect::<Result<_>>()?,
            previous_serial: self.previous_serial,
            previous_svid_expires_at: self.previous_svid_expires_at,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct JoinTokenRecord {
    pub(super) spiffe_id: String,
    pub(super) expires_at: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct ActivityRecord {
    pub(super) last_issued: Option<i64>,
    pub(super) last_fetched: Option<i64>,
    /// The live set records written before kept here; new ones derive it from the
    /// issuance records, and keep it empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) live: Vec<LiveSvidRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LiveSvidRecord {
    pub(super) kind: String,
    pub(super) serial: String,
    pub(super) node: String,
    pub(super) expires_at: i64,
}

impl ActivityRecord {
    /// Moves `last_issued` forward to `at`: what a pruned issuance record leaves behind.
    pub(super) fn note_issued_at(&mut self, at: i64) {
        self.last_issued = Some(self.last_issued.map_or(at, |t| t.max(at)));
    }

    /// Notes a fetch at `now` (never moving `last_fetched` back).
    pub(super) fn note_fetched(&mut self, now: i64) {
        self.last_fetched = Some(self.last_fetched.map_or(now, |t| t.max(now)));
    }

    /// The stored part of `a`: its live set derives from the issuance records (copied on
    /// their own), so it is not kept here.
    pub(super) fn from_activity(a: &EntryActivity) -> Self {
        Self {
            last_issued: a.last_issued,
            last_fetched: a.last_fetched,
            live: Vec::new(),
        }
    }

    pub(super) fn into_activity(self) -> EntryActivity {
        EntryActivity {
            last_issued: self.last_issued,
            last_fetched: self.last_fetched,
            live: self
                .live
                .into_iter()
                .map(|l| LiveSvid {
                    kind: l.kind,
                    serial: l.serial,
                    node: l.node,
                    expires_at: l.expires_at,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OwnerRecord {
    pub(super) disabled: bool,
    pub(super) changed_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HopRecord {
    pub(super) agent: String,
    pub(super) grant_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct GrantRecord {
    pub(super) id: String,
    pub(super) principal: String,
    pub(super) chain: Vec<HopRecord>,
    pub(super) scopes: Vec<String>,
    pub(super) expires_at: i64,
    pub(super) remaining_depth: u32,
    pub(super) task_id: Option<String>,
    pub(super) parent_grant_id: Option<String>,
    pub(super) created_at: i64,
    /// Absent in records written before the OAuth front door existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) resources: Vec<String>,
}

impl GrantRecord {
    pub(super) fn from_grant(g: &Grant) -> Self {
        let d = &g.delegation;
        Self {
            id: g.id.to_string(),
            principal: d.principal.to_string(),
            chain: d
                .chain
                .iter()
                .map(|h| HopRecord {
                    agent: h.agent.to_string(),
                    grant_id: h.grant_id.to_string(),
                })
                .collect(),
            scopes: d.scopes.to_strings(),
            expires_at: d.expires_at,
            remaining_depth: d.remaining_depth,
            task_id: d.task_id.as_ref().map(ToString::to_string),
            parent_grant_id: g.parent_grant_id.as_ref().map(ToString::to_string),
            created_at: g.created_at,
            resources: g.resources.iter().map(ToString::to_string).collect(),
        }
    }

    pub(super) fn into_grant(self, key: &[u8]) -> Result<Grant> {
        let chain = self
            .chain
            .into_iter()
            .map(|h| {
                Ok(Hop {
                    agent: SpiffeId::new(&h.agent).map_err(|e| corrupt(key, "chain", e))?,
                    grant_id: h.grant_id.parse().map_err(|e| corrupt(key, "chain", e))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if chain.is_empty() {
            return Err(corrupt(key, "chain", "empty"));
        }
        Ok(Grant {
            id: self.id.parse().map_err(|e| corrupt(key, "id", e))?,
            delegation: Delegation {
                principal: self
                    .principal
                    .parse()
                    .map_err(|e| corrupt(key, "principal", e))?,
                chain,
                scopes: ScopeSet::parse(&self.scopes).map_err(|e| corrupt(key, "scopes", e))?,
                expires_at: self.expires_at,
                remaining_depth: self.remaining_depth,
                task_id: self
                    .task_id
                    .map(|t| t.parse())
                    .transpose()
                    .map_err(|e| corrupt(key, "task_id", e))?,
            },
            parent_grant_id: self
                .parent_grant_id
                .map(|p| p.parse())
                .transpose()
                .map_err(|e| corrupt(key, "parent_grant_id", e))?,
            created_at: self.created_at,
            resources: crate::model::oauth::parse_prefixes(&self.resources)
                .map_err(|e| corrupt(key, "resources", e))?,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OfferRecord {
    pub(super) parent_grant_id: String,
    pub(super) from: String,
    pub(super) to: String,
    pub(super) scopes: Vec<String>,
    pub(super) expires_at: i64,
    /// Absent in records written before offers were pruned: those are pruned at once
    /// (their token lived at most five minutes).
    #[serde(default)]
    pub(super) redeem_by: i64,
}

/// SHA-256 over the length-prefixed SPIFFE ID, parent ID and (sorted) selectors: two entries
/// with the same key are the same identity.
pub(super) fn identity_key(spec: &EntrySpec) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut part = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    part(spec.spiffe_id.to_string().as_bytes());
    part(spec.parent_id.to_string().as_bytes());
    for sel in &spec.selectors {
        part(sel.to_string().as_bytes());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

impl OfferRecord {
    pub(super) fn from_offer(offer: &super::DelegationOffer) -> Self {
        Self {
            parent_grant_id: offer.parent_grant_id.to_string(),
            from: offer.from.to_string(),
            to: offer.to.to_string(),
            scopes: offer.scopes.to_strings(),
            expires_at: offer.expires_at,
            redeem_by: offer.redeem_by,
        }
    }

    pub(super) fn into_offer(self, id: &str) -> Result<super::DelegationOffer> {
        let key = id.as_bytes();
        Ok(super::DelegationOffer {
            id: id.to_string(),
            parent_grant_id: self
                .parent_grant_id
                .parse()
                .map_err(|e| corrupt(key, "parent_grant_id", e))?,
            from: SpiffeId::new(&self.from).map_err(|e| corrupt(key, "from", e))?,
            to: SpiffeId::new(&self.to).map_err(|e| corrupt(key, "to", e))?,
            scopes: ScopeSet::parse(&self.scopes).map_err(|e| corrupt(key, "scopes", e))?,
            expires_at: self.expires_at,
            redeem_by: self.redeem_by,
        })
    }
}

/// What one server published of its authorities (see [`super::ServerAuthorities`]).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ServerAuthoritiesRecord {
    /// Base64 (standard) DER CA certificates.
    pub(super) x509: Vec<String>,
    pub(super) jwt: Vec<JwtAuthorityRecord>,
    #[serde(default)]
    pub(super) sequence: u64,
    pub(super) updated_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct JwtAuthorityRecord {
    pub(super) key_id: String,
    /// Base64 (standard) SubjectPublicKeyInfo DER.
    pub(super) public_key: String,
    pub(super) expires_at: i64,
}

impl ServerAuthoritiesRecord {
    pub(super) fn from_published(a: &super::ServerAuthorities) -> Self {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        Self {
            x509: a.x509_authorities.iter().map(|d| b64.encode(d)).collect(),
            jwt: a
                .jwt_authorities
                .iter()
                .map(|j| JwtAuthorityRecord {
                    key_id: j.key_id.clone(),
                    public_key: b64.encode(&j.public_key_spki_der),
                    expires_at: crate::clock::unix_seconds(j.expires_at),
                })
                .collect(),
            sequence: a.sequence,
            updated_at: a.updated_at,
        }
    }

    pub(super) fn into_published(
        self,
        key: &[u8],
        server_id: String,
    ) -> Result<super::ServerAuthorities> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let x509_authorities = self
            .x509
            .iter()
            .map(|d| b64.decode(d).map_err(|e| corrupt(key, "x509", e)))
            .collect::<Result<Vec<_>>>()?;
        let jwt_authorities = self
            .jwt
            .into_iter()
            .map(|j| {
                Ok(crate::bundle::JwtAuthority {
                    public_key_spki_der: b64
                        .decode(&j.public_key)
                        .map_err(|e| corrupt(key, "jwt.public_key", e))?,
                    key_id: j.key_id,
                    expires_at: crate::clock::from_unix_seconds(j.expires_at),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(super::ServerAuthorities {
            server_id,
            x509_authorities,
            jwt_authorities,
            sequence: self.sequence,
            updated_at: self.updated_at,
        })
    }
}

/// A federation relationship as stored (by trust domain name).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FederationRecord {
    pub(super) trust_domain: String,
    pub(super) bundle_endpoint_url: String,
    /// "https_web" or "https_spiffe".
    pub(super) profile: String,
    #[serde(default)]
    pub(super) endpoint_spiffe_id: Option<String>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
}

impl FederationRecord {
    pub(super) fn from_relationship(r: &FederationRelationship) -> Self {
        Self {
            trust_domain: r.trust_domain.as_str().to_string(),
            bundle_endpoint_url: r.bundle_endpoint_url.to_string(),
            profile: r.profile.name().to_string(),
            endpoint_spiffe_id: r.profile.endpoint_spiffe_id().map(ToString::to_string),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }

    pub(super) fn into_relationship(self, key: &[u8]) -> Result<FederationRelationship> {
        let profile = match (self.profile.as_str(), self.endpoint_spiffe_id) {
            ("https_web", _) => EndpointProfile::HttpsWeb,
            ("https_spiffe", Some(id)) => EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::new(&id)
                    .map_err(|e| corrupt(key, "endpoint_spiffe_id", e))?,
            },
            ("https_spiffe", None) => {
                return Err(corrupt(
                    key,
                    "endpoint_spiffe_id",
                    "missing for https_spiffe",
                ))
            }
            (other, _) => return Err(corrupt(key, "profile", format!("unknown {other:?}"))),
        };
        Ok(FederationRelationship {
            trust_domain: TrustDomain::new(&self.trust_domain)
                .map_err(|e| corrupt(key, "trust_domain", e))?,
            bundle_endpoint_url: self
                .bundle_endpoint_url
                .parse()
                .map_err(|e| corrupt(key, "bundle_endpoint_url", e))?,
            profile,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// A federated bundle as stored: the SPIFFE bundle document itself.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FederatedBundleRecord {
    pub(super) trust_domain: String,
    pub(super) spiffe_json: String,
    /// "static" or "endpoint".
    pub(super) source: String,
    pub(super) updated_at: i64,
}

impl FederatedBundleRecord {
    pub(super) fn from_bundle(b: &FederatedBundle) -> Self {
        Self {
            trust_domain: b.bundle.trust_domain.as_str().to_string(),
            spiffe_json: b.bundle.to_spiffe_json(),
            source: b.source.name().to_string(),
            updated_at: b.updated_at,
        }
    }

    pub(super) fn into_bundle(self, key: &[u8]) -> Result<FederatedBundle> {
        let td =
            TrustDomain::new(&self.trust_domain).map_err(|e| corrupt(key, "trust_domain", e))?;
        let bundle = crate::bundle::Bundle::from_spiffe_json(td, &self.spiffe_json)
            .map_err(|e| corrupt(key, "spiffe_json", e))?;
        let source = match self.source.as_str() {
            "static" => BundleSource::Static,
            "endpoint" => BundleSource::Endpoint,
            other => return Err(corrupt(key, "source", format!("unknown {other:?}"))),
        };
        Ok(FederatedBundle {
            bundle,
            source,
            updated_at: self.updated_at,
        })
    }
}
