//! Moving a server's records from one store to another (`agentd server migrate --to
//! postgres://...`): read everything that matters from the source through the
//! [`DataStore`] trait, then write it into an empty target in one transaction.
//!
//! Copied: entries (with their ids and revisions) and their activity, attested nodes, live
//! issued-SVID records, the revocation log (with its sequence numbers and head), the audit
//! log (records as stored, so the chain and its MACs verify with the same audit key), grants
//! and owners, the used platform token ids, federation relationships and federated bundles. Not copied: unused join tokens and delegation
//! offers (short-lived: make new ones), and what the servers published of their authorities
//! (each server publishes again at start).

use super::AttestedNode;
use super::{DataStore, Entry, EntryActivity, EntryFilter, EntryId, Grant, OwnerState, Result};
use crate::model::audit::{AuditHead, StoredAuditRecord};
use crate::model::revocation::{IssuedSvid, RevocationEvent};

/// Everything a migration moves.
#[derive(Debug, Default)]
pub struct StoreCopy {
    pub entries: Vec<Entry>,
    pub nodes: Vec<AttestedNode>,
    pub issued: Vec<IssuedSvid>,
    pub revocations: Vec<RevocationEvent>,
    pub revocation_head: u64,
    pub audit: Vec<StoredAuditRecord>,
    pub audit_head: Option<AuditHead>,
    pub grants: Vec<Grant>,
    pub owners: Vec<OwnerState>,
    /// Activity of the entries that have any, by entry id.
    pub activity: Vec<(EntryId, EntryActivity)>,
    /// Used platform token ids (digests) and until when they stay used: without them a
    /// captured token could be presented again after the move.
    pub seen_tokens: Vec<(Vec<u8>, i64)>,
    pub federations: Vec<crate::model::federation::FederationRelationship>,
    pub federated_bundles: Vec<crate::model::federation::FederatedBundle>,
}

/// Audit records read per call.
const AUDIT_PAGE: usize = 5_000;

impl StoreCopy {
    /// Reads what a migration moves from `source`; issued records still live at `now`.
    pub async fn read(source: &dyn DataStore, now: i64) -> Result<Self> {
        let mut audit = Vec::new();
        loop {
            let after = audit.last().map_or(0, |r: &StoredAuditRecord| r.seq);
            let page = source.audit_records(after, AUDIT_PAGE).await?;
            let short = page.len() < AUDIT_PAGE;
            audit.extend(page);
            if short {
                break;
            }
        }
        Ok(Self {
            entries: source.list_entries(&EntryFilter::default()).await?,
            nodes: source.list_nodes().await?,
            issued: source.list_issued(now).await?,
            revocations: source.list_revocations().await?,
            revocation_head: source.revocation_head().await?,
            audit,
            audit_head: source.audit_head().await?,
            grants: source.list_grants().await?,
            owners: source.list_owners().await?,
            activity: {
                let mut all: Vec<_> = source.entry_activity().await?.into_iter().collect();
                all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
                all
            },
            seen_tokens: source.list_seen_tokens().await?,
            federations: source.list_federations().await?,
            federated_bundles: source.list_federated_bundles().await?,
        })
    }
}
