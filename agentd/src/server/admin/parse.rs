//! Parsing at the edge: every raw field of an admin request becomes a typed value here, or an
//! error naming the field.

use agentd_attestor::Selector;
use agentd_proto::admin as pb;
use spiffe::SpiffeId;

use super::{invalid, AdminApi, AdminError};
use crate::clock::unix_seconds;
use crate::datastore::{EntryId, EntrySpec};
use crate::ttl::Ttl;
use std::collections::BTreeSet;

/// The longest SPIFFE ID an entry may have (SPIFFE-ID §2.3).
const MAX_SPIFFE_ID_BYTES: usize = 2048;

impl AdminApi {
    pub(super) fn spiffe_id_in_domain(
        &self,
        field: &str,
        raw: &str,
    ) -> Result<SpiffeId, AdminError> {
        if raw.is_empty() {
            return Err(invalid(field, "is required"));
        }
        // SPIFFE-ID §2.3: implementations SHOULD NOT generate URIs longer than 2048 bytes, and
        // relying parties need only support that much: an entry longer would mint SVIDs
        // other verifiers may refuse.
        if raw.len() > MAX_SPIFFE_ID_BYTES {
            return Err(invalid(
                field,
                format!(
                    "is {} bytes, more than the SPIFFE limit of {MAX_SPIFFE_ID_BYTES}",
                    raw.len()
                ),
            ));
        }
        let id = SpiffeId::new(raw).map_err(|e| invalid(field, format!("{raw:?}: {e}")))?;
        if !id.is_member_of(&self.state.config.trust_domain) {
            return Err(invalid(
                field,
                format!(
                    "{id} is not in this server's trust domain {}",
                    self.state.config.trust_domain
                ),
            ));
        }
        if id.path().is_empty() {
            return Err(invalid(field, format!("{id} has no path")));
        }
        Ok(id)
    }

    /// An identity to issue (a node's or a workload's): never in the reserved `/agentd/`
    /// namespace, which holds the server's own identity that node agents trust.
    pub(super) fn issuable_id(&self, field: &str, raw: &str) -> Result<SpiffeId, AdminError> {
        let id = self.spiffe_id_in_domain(field, raw)?;
        if id.path() == crate::tls::RESERVED_PATH_PREFIX.trim_end_matches('/')
            || id.path().starts_with(crate::tls::RESERVED_PATH_PREFIX)
        {
            return Err(invalid(
                field,
                format!("{id} is reserved for the server's own identity"),
            ));
        }
        Ok(id)
    }

    pub(super) fn now(&self) -> i64 {
        unix_seconds(self.state.clock.now())
    }

    pub(super) fn ttl(&self, field: &str, secs: i64, default: Ttl) -> Result<Ttl, AdminError> {
        Ok(Ttl::from_proto_secs(secs)
            .map_err(|e| invalid(field, e))?
            .unwrap_or(default))
    }

    pub(super) fn spec_from_proto(&self, p: pb::EntrySpec) -> Result<EntrySpec, AdminError> {
        let cfg = &self.state.config;
        Ok(EntrySpec {
            spiffe_id: self.issuable_id("spiffe_id", &p.spiffe_id)?,
            parent_id: self.spiffe_id_in_domain("parent_id", &p.parent_id)?,
            selectors: parse_selectors(&p.selectors)?,
            x509_svid_ttl: self.ttl(
                "x509_svid_ttl",
                p.x509_svid_ttl_seconds,
                cfg.default_x509_svid_ttl,
            )?,
            jwt_svid_ttl: self.ttl(
                "jwt_svid_ttl",
                p.jwt_svid_ttl_seconds,
                cfg.default_jwt_svid_ttl,
            )?,
            dns_names: parse_dns_names(&p.dns_names)?,
            hint: parse_hint(&p.hint)?,
            scopes: parse_scopes(&p.scopes)?,
            owner: parse_owner(&p.owner)?,
            federates_with: super::federation::parse_federates_with(
                &p.federates_with,
                &cfg.trust_domain,
            )?,
            resources: parse_resources(&p.resources)?,
        })
    }
}

/// An entry's `--resource` prefixes (RFC 8707 resource URLs).
pub fn parse_resources(
    raw: &[String],
) -> Result<Vec<crate::model::oauth::ResourcePrefix>, AdminError> {
    crate::model::oauth::parse_prefixes(raw).map_err(|e| invalid("resource", e))
}

pub fn parse_selectors(raw: &[String]) -> Result<Vec<Selector>, AdminError> {
    if raw.is_empty() {
        return Err(invalid("selector", "at least one selector is required"));
    }
    let mut set = BTreeSet::new();
    for s in raw {
        let sel: Selector = s.parse().map_err(|e| invalid("selector", e))?;
        // Only selectors some attestor can produce: a typo would never match anything.
        agentd_attestor::validate_selector(&sel).map_err(|e| invalid("selector", e))?;
        set.insert(sel);
    }
    Ok(set.into_iter().collect())
}

/// DNS SANs: LDH labels, optionally a leading `*.` wildcard (RFC 5280 4.2.1.6, RFC 6125).
pub fn parse_dns_names(raw: &[String]) -> Result<Vec<String>, AdminError> {
    let mut out = Vec::new();
    for name in raw {
        let host = name.strip_prefix("*.").unwrap_or(name);
        let ok = !host.is_empty()
            && name.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(invalid(
                "dns_name",
                format!("{name:?} is not a valid DNS name"),
            ));
        }
        let lower = name.to_ascii_lowercase();
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    Ok(out)
}

/// Workload API spec: a hint is at most 1024 bytes.
pub fn parse_hint(raw: &str) -> Result<String, AdminError> {
    if raw.len() > 1024 || raw.chars().any(char::is_control) {
        return Err(invalid("hint", "must be at most 1024 printable bytes"));
    }
    Ok(raw.to_string())
}

/// Scopes are `resource:action` strings (`resource:*` as a wildcard), parsed as
/// [`crate::delegation::Scope`]; an entry's scopes are the ceiling of its identity.
pub fn parse_scopes(raw: &[String]) -> Result<Vec<String>, AdminError> {
    crate::delegation::ScopeSet::parse(raw)
        .map(|set| set.to_strings())
        .map_err(|e| invalid("scope", e))
}

pub fn parse_owner(raw: &str) -> Result<Option<String>, AdminError> {
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() > 256 || raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("owner", "must be at most 256 bytes without spaces"));
    }
    Ok(Some(raw.to_string()))
}

pub(super) fn parse_node_id(raw: &str) -> Result<SpiffeId, AdminError> {
    SpiffeId::new(raw).map_err(|e| invalid("spiffe_id", format!("{raw:?}: {e}")))
}

pub(super) fn parse_entry_id(raw: &str) -> Result<EntryId, AdminError> {
    raw.parse().map_err(|e| invalid("id", e))
}
