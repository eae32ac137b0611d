//! The RFC 5280 CRLs the server publishes, one per authority, for relying parties that only
//! know CRLs (CLI `bundle crl`, node agents' `FetchCrls`).

use agentd_proto::revocation as rpb;

use super::ServerState;
use crate::clock::unix_seconds;

/// One RFC 5280 CRL per X.509 authority in the bundle, listing its unexpired revoked
/// serials; the CRL number is the revocation log's head, so it grows with every change.
pub fn current_crls(state: &ServerState) -> Result<Vec<rpb::Crl>, crate::ca::CaError> {
    let now = state.clock.now();
    let now_secs = unix_seconds(now);
    let head = state.revocations.head();
    state
        .ca
        .authorities()
        .into_iter()
        .filter(|a| a.kind == crate::ca::AuthorityKind::X509)
        .map(|a| {
            let revoked: Vec<crate::ca::RevokedSerial> = state
                .revocations
                .revoked_serials_of(&a.id, now_secs)
                .into_iter()
                .map(|(serial_hex, at)| crate::ca::RevokedSerial {
                    serial_hex,
                    revoked_at: crate::clock::from_unix_seconds(at),
                })
                .collect();
            let der = state.ca.crl_der(&a.id, &revoked, head, now)?;
            Ok(rpb::Crl {
                authority_id: a.id,
                der,
            })
        })
        .collect()
}
