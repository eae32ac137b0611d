//! The X.509 side of the CA: making the CA certificate (self-signed root or intermediate
//! under an upstream CA), checking a stored one, and minting X.509-SVIDs from CSRs.
//!
//! Long on purpose: the certificate profile (X509-SVID spec: leaf, CA, CRL) is one set of
//! rules, and keeping the builders and the checks of stored certificates together keeps
//! them from drifting apart. Its tests are in `ca/tests.rs`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use spiffe::TrustDomain;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

use super::{CaError, IssuedX509Svid, RevokedSerial, UpstreamCa, X509SvidParams};
use crate::clock::{from_unix_seconds, unix_seconds};
use crate::keys::{CertSigner, PrivateKey};

/// NotBefore backdating, for clock skew between the server and relying parties.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Largest CSR accepted.
pub const MAX_CSR_LEN: usize = 16 * 1024;

fn sign_err(reason: impl std::fmt::Display) -> CaError {
    CaError::Sign {
        reason: reason.to_string(),
    }
}

fn upstream_err(reason: impl std::fmt::Display) -> CaError {
    CaError::Upstream {
        reason: reason.to_string(),
    }
}

fn odt(secs: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| sign_err(format!("time {secs}: {e}")))
}

/// A random serial in [1, 2^127): 16 random bytes with the top bit cleared, so the DER
/// INTEGER is positive and at most 16 bytes.
pub(crate) fn random_serial() -> [u8; 16] {
    loop {
        let mut s: [u8; 16] = rand::random();
        s[0] &= 0x7f;
        if s.iter().any(|b| *b != 0) {
            return s;
        }
    }
}

/// Lowercase hex without leading zeros.
pub(crate) fn serial_hex(serial: &[u8]) -> String {
    let h = hex::encode(serial);
    let t = h.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.to_owned()
    }
}

fn spiffe_uri_san(uri: String) -> Result<SanType, CaError> {
    Ok(SanType::URI(uri.try_into().map_err(|e| {
        sign_err(format!("URI SAN is not IA5: {e}"))
    })?))
}

fn ca_dn(trust_domain: &TrustDomain, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if !organization.is_empty() {
        dn.push(DnType::OrganizationName, organization);
    }
    dn.push(DnType::CommonName, trust_domain.as_str());
    dn
}

/// Certificate parameters for a CA certificate of `trust_domain` valid from `now - 10 s`
/// until `not_after`.
fn ca_params(
    trust_domain: &TrustDomain,
    organization: &str,
    now: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_dn(trust_domain, organization);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    p.subject_alt_names = vec![spiffe_uri_san(trust_domain.id_string())?];
    p.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    p.not_before = odt(now - BACKDATE.as_secs() as i64)?;
    p.not_after = odt(not_after)?;
    Ok(p)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(cert)
}

/// rcgen panics on a name with an empty RDN; refuse such names first.
fn name_is_usable(name: &x509_parser::x509::X509Name<'_>) -> bool {
    name.iter().all(|rdn| rdn.iter().count() == 1)
}

fn is_ca_cert(cert: &X509Certificate<'_>) -> bool {
    let ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let ku_ok = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    ca && ku_ok
}

/// Builds the rcgen issuer for `cert_der` signed with `key`, and checks with a probe
/// certificate that the key belongs to the certificate and that the issuer name rcgen
/// writes is byte-identical to the certificate's subject (path building compares names
/// byte by byte).
fn issuer_for<S: SigningKey>(cert_der: &[u8], key: S) -> Result<Issuer<'static, S>, String> {
    let cert = parse_cert(cert_der)?;
    if !name_is_usable(cert.subject()) {
        return Err("the subject has a multi-valued or empty RDN, which is not supported".into());
    }
    let issuer = Issuer::from_ca_cert_der(&cert_der.to_vec().into(), key)
        .map_err(|e| format!("reading the CA certificate: {e}"))?;

    let mut probe = CertificateParams::default();
    probe.not_before = odt(0).map_err(|e| e.to_string())?;
    probe.not_after = odt(60).map_err(|e| e.to_string())?;
    probe.serial_number = Some(SerialNumber::from_slice(&[1]));
    let probe = probe
        .signed_by(issuer.key(), &issuer)
        .map_err(|e| format!("signing a probe certificate: {e}"))?;
    let probe = parse_cert(probe.der())?;
    if probe.issuer().as_raw() != cert.subject().as_raw() {
        return Err(
            "the subject cannot be reproduced byte for byte as an issuer name (unsupported string types or repeated attributes)"
                .into(),
        );
    }
    probe
        .verify_signature(Some(cert.public_key()))
        .map_err(|_| "the private key does not belong to the certificate".to_string())?;
    Ok(issuer)
}

/// A key that can sign an intermediate: P-256 through ring, or anything else rcgen loads
/// (RSA, P-384, Ed25519) for an upstream CA.
enum UpstreamKey {
    P256(CertSigner),
    Other(rcgen::KeyPair),
}

impl std::fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamKey(<redacted>)")
    }
}

impl PublicKeyData for UpstreamKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            Self::P256(k) => k.der_bytes(),
            Self::Other(k) => k.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::P256(k) => k.algorithm(),
            Self::Other(k) => k.algorithm(),
        }
    }
}

impl SigningKey for UpstreamKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            Self::P256(k) => k.sign(msg),
            Self::Other(k) => k.sign(msg),
        }
    }
}

/// An upstream CA loaded from disk.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub cert_der: Vec<u8>,
    /// What goes in the bundle: the upstream certificate, then the bundle file's roots.
    pub roots: Vec<Vec<u8>>,
    pub not_after: i64,
    issuer: Issuer<'static, UpstreamKey>,
    has_ski: bool,
}

fn read_text(path: &Path, what: &str) -> Result<Zeroizing<String>, CaError> {
    let bytes =
        std::fs::read(path).map_err(|e| upstream_err(format!("{what} {}: {e}", path.display())))?;
    String::from_utf8(bytes)
        .map(Zeroizing::new)
        .map_err(|_| upstream_err(format!("{what} {}: not PEM text", path.display())))
}

impl Upstream {
    pub fn load(cfg: &UpstreamCa, now: SystemTime) -> Result<Self, CaError> {
        let cert_pem = read_text(&cfg.cert_file, "certificate")?;
        let certs = crate::bundle::Bundle::x509_authorities_from_pem(&cert_pem)
            .map_err(|e| upstream_err(format!("{}: {e}", cfg.cert_file.display())))?;
        let cert_der = certs[0].clone();
        let (not_after, has_ski) = {
            let cert = parse_cert(&cert_der)
                .map_err(|e| upstream_err(format!("{}: {e}", cfg.cert_file.display())))?;
            if !is_ca_cert(&cert) {
                return Err(upstream_err(format!(
                    "{}: not a CA certificate (BasicConstraints CA=true and keyCertSign needed)",
                    cfg.cert_file.display()
                )));
            }
            let not_after = cert.validity().not_after.timestamp();
            if not_after <= unix_seconds(now) {
                return Err(upstream_err(format!(
                    "{}: the upstream certificate expired at {}",
                    cfg.cert_file.display(),
                    cert.validity().not_after
                )));
            }
            let has_ski = cert
                .extensions()
                .iter()
                .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER);
            (not_after, has_ski)
        };

        let key_pem = read_text(&cfg.key_file, "key")?;
        let key = match PrivateKey::from_pem(&key_pem) {
            Ok(k) => UpstreamKey::P256(k.cert_signer()?),
            Err(p256_err) => {
                UpstreamKey::Other(rcgen::KeyPair::from_pem(&key_pem).map_err(|e| {
                    upstream_err(format!(
                        "{}: not a usable private key ({p256_err}; {e})",
                        cfg.key_file.display()
                    ))
                })?)
            }
        };
        let issuer = issuer_for(&cert_der, key).map_err(|e| {
            upstream_err(format!(
                "{} / {}: {e}",
                cfg.cert_file.display(),
                cfg.key_file.display()
            ))
        })?;

        let mut roots = vec![cert_der.clone()];
        if let Some(bundle_file) = &cfg.bundle_file {
            let pem = read_text(bundle_file, "bundle")?;
            for der in crate::bundle::Bundle::x509_authorities_from_pem(&pem)
                .map_err(|e| upstream_err(format!("{}: {e}", bundle_file.display())))?
            {
                if !roots.contains(&der) {
                    roots.push(der);
                }
            }
        }
        Ok(Self {
            cert_der,
            roots,
            not_after,
            issuer,
            has_ski,
        })
    }

    /// Whether `cert_der` was signed by this upstream CA.
    fn signed(&self, cert: &X509Certificate<'_>) -> bool {
        let Ok(up) = parse_cert(&self.cert_der) else {
            return false;
        };
        cert.issuer().as_raw() == up.subject().as_raw()
            && cert.verify_signature(Some(up.public_key())).is_ok()
    }
}

/// Makes a new CA certificate for `key`: self-signed, or signed by `upstream`.
pub(crate) fn new_ca_cert(
    trust_domain: &TrustDomain,
    organization: &str,
    key: &PrivateKey,
    upstream: Option<&Upstream>,
    now: SystemTime,
    ca_ttl: Duration,
) -> Result<Vec<u8>, CaError> {
    let now = unix_seconds(now);
    let ttl = i64::try_from(ca_ttl.as_secs()).unwrap_or(i64::MAX);
    let mut not_after = now.saturating_add(ttl);
    let signer = key.cert_signer()?;
    match upstream {
        None => {
            let params = ca_params(trust_domain, organization, now, not_after)?;
            let cert = params
                .self_signed(&signer)
                .map_err(|e| sign_err(format!("self-signing the CA certificate: {e}")))?;
            Ok(cert.der().to_vec())
        }
        Some(up) => {
            not_after = not_after.min(up.not_after);
            let mut params = ca_params(trust_domain, organization, now, not_after)?;
            params.use_authority_key_identifier_extension = up.has_ski;
            let cert = params
                .signed_by(&signer, &up.issuer)
                .map_err(|e| upstream_err(format!("signing the intermediate: {e}")))?;
            let der = cert.der().to_vec();
            let parsed = parse_cert(&der).map_err(upstream_err)?;
            if !up.signed(&parsed) {
                return Err(upstream_err(
                    "the new intermediate does not verify under the upstream certificate",
                ));
            }
            Ok(der)
        }
    }
}

/// Why a stored CA certificate cannot be used any more (then a new one is made), or None.
pub(crate) fn stored_cert_problem(
    cert_der: &[u8],
    trust_domain: &TrustDomain,
    upstream: Option<&Upstream>,
    now: SystemTime,
) -> Result<Option<StoredCertProblem>, String> {
    let cert = parse_cert(cert_der)?;
    let not_after = cert.validity().not_after.timestamp();
    if not_after <= unix_seconds(now) {
        return Ok(Some(StoredCertProblem::Expired(format!(
            "the stored CA certificate expired at {}",
            cert.validity().not_after
        ))));
    }
    Ok(stored_cert_mismatch(&cert, trust_domain, upstream).map(StoredCertProblem::Mismatch))
}

/// Why a stored CA certificate cannot sign now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoredCertProblem {
    /// Past its notAfter: it is dropped from the set (its files stay on disk).
    Expired(String),
    /// It does not match the configuration (trust domain, upstream CA): the server refuses
    /// to start rather than replace the CA.
    Mismatch(String),
}

fn stored_cert_mismatch(
    cert: &X509Certificate<'_>,
    trust_domain: &TrustDomain,
    upstream: Option<&Upstream>,
) -> Option<String> {
    let want = trust_domain.id_string();
    let has_id = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == want)),
        _ => false,
    };
    if !has_id {
        return Some(format!(
            "the stored CA certificate is not for {want} (was the trust domain changed?)"
        ));
    }
    match upstream {
        Some(up) if !up.signed(cert) => {
            Some("the stored CA certificate is not signed by the configured upstream CA".into())
        }
        None if cert.issuer().as_raw() != cert.subject().as_raw()
            || cert.verify_signature(None).is_err() =>
        {
            Some(
                "the stored CA certificate is not self-signed and no upstream CA is configured (was [upstream_ca] removed?)"
                    .into(),
            )
        }
        _ => None,
    }
}

/// The public key of a CSR (ECDSA P-256, uncompressed point).
#[derive(Debug)]
pub(crate) struct CsrKey {
    point: Vec<u8>,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

fn csr_err(reason: impl Into<String>) -> CaError {
    CaError::Csr {
        reason: reason.into(),
    }
}

/// Parses a PKCS#10 CSR, checks that its key is ECDSA P-256 and that its signature verifies,
/// and returns only its public key.
pub(crate) fn parse_csr(der: &[u8]) -> Result<CsrKey, CaError> {
    if der.is_empty() {
        return Err(csr_err("empty"));
    }
    if der.len() > MAX_CSR_LEN {
        return Err(csr_err(format!(
            "{} bytes, more than the limit of {MAX_CSR_LEN}",
            der.len()
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| csr_err(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(csr_err("trailing bytes after the request"));
    }
    let spki = &csr.certification_request_info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(csr_err(format!(
            "public key algorithm {} is not id-ecPublicKey (only ECDSA P-256 keys are accepted)",
            spki.algorithm.algorithm
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(csr_err(format!(
            "EC curve {} is not P-256",
            curve.map_or_else(|| "(none)".to_string(), |c| c.to_id_string())
        )));
    }
    let point = &spki.subject_public_key.data;
    if point.len() != 65 || point[0] != 0x04 {
        return Err(csr_err("public key is not an uncompressed P-256 point"));
    }
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(csr_err(format!(
            "signature algorithm {} is not ecdsa-with-SHA256",
            csr.signature_algorithm.algorithm
        )));
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point[..])
        .verify(
            csr.certification_request_info.raw,
            &csr.signature_value.data,
        )
        .map_err(|_| csr_err("signature does not verify with the request's public key"))?;
    Ok(CsrKey {
        point: point.to_vec(),
    })
}

/// The signing CA, ready for the hot path: the rcgen issuer (name, key id, key) is built
/// once at load.
pub(crate) struct SigningCa {
    issuer: Issuer<'static, CertSigner>,
    /// Lowercase hex of the certificate's Subject Key Identifier: the authority id.
    pub authority_id: String,
    ski: Vec<u8>,
    pub not_before: SystemTime,
    /// The signing CA's certificate.
    pub cert_der: Vec<u8>,
    /// Certificates after the leaf in every SVID chain (the intermediate, with an upstream).
    chain_tail: Vec<Vec<u8>>,
    pub not_after: SystemTime,
    not_after_secs: i64,
    leaf_dn: DistinguishedName,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa")
            .field("authority_id", &self.authority_id)
            .field("issuer", &self.issuer)
            .field("not_after", &self.not_after)
            .field("chain_tail", &self.chain_tail.len())
            .finish_non_exhaustive()
    }
}

impl SigningCa {
    pub fn new(
        cert_der: Vec<u8>,
        key: &PrivateKey,
        organization: &str,
        intermediate: bool,
    ) -> Result<Self, String> {
        let (not_before_secs, not_after_secs, ski) = {
            let cert = parse_cert(&cert_der)?;
            (
                cert.validity().not_before.timestamp(),
                cert.validity().not_after.timestamp(),
                subject_key_id(&cert),
            )
        };
        let signer = key.cert_signer().map_err(|e| e.to_string())?;
        let issuer = issuer_for(&cert_der, signer)?;
        // With no organization the subject is empty, and rcgen then marks the SAN
        // extension critical, as RFC 5280 and the X509-SVID spec require.
        let mut leaf_dn = DistinguishedName::new();
        if !organization.is_empty() {
            leaf_dn.push(DnType::OrganizationName, organization);
        }
        Ok(Self {
            issuer,
            authority_id: hex::encode(&ski),
            ski,
            not_before: from_unix_seconds(not_before_secs),
            chain_tail: if intermediate {
                vec![cert_der.clone()]
            } else {
                Vec::new()
            },
            cert_der,
            not_after: from_unix_seconds(not_after_secs),
            not_after_secs,
            leaf_dn,
        })
    }

    /// Signs an X.509-SVID as [`X509SvidParams`] describes. `params.extensions` are always
    /// added non-critical: a relying party that does not know them must still accept the
    /// SVID (RFC 5280 4.2).
    pub fn sign(
        &self,
        trust_domain: &TrustDomain,
        req: &X509SvidParams<'_>,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let id = req.spiffe_id;
        if !id.is_member_of(trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                spiffe_id: id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        if id.path().is_empty() {
            return Err(sign_err(format!(
                "{id} has no path: an X.509-SVID leaf needs one"
            )));
        }
        let now_secs = unix_seconds(now);
        if now_secs >= self.not_after_secs {
            return Err(CaError::Expired {
                not_after: self.not_after,
            });
        }
        if req.ttl.as_secs() == 0 {
            return Err(sign_err("the TTL must be at least 1 second"));
        }
        let key = parse_csr(req.csr_der)?;

        let mut sans = Vec::with_capacity(1 + req.dns_names.len());
        sans.push(spiffe_uri_san(id.to_string())?);
        for name in req.dns_names {
            // An IP literal is an iPAddress SAN (RFC 5280 4.2.1.6): clients match an IP
            // host only against those (RFC 6125 section 1.7.2).
            if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                sans.push(SanType::IpAddress(ip));
                continue;
            }
            if name.is_empty()
                || name.len() > 253
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'))
            {
                return Err(sign_err(format!(
                    "DNS name {name:?} is not a valid host name"
                )));
            }
            sans.push(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|e| sign_err(format!("DNS name {name:?}: {e}")))?,
            ));
        }

        let ttl = i64::try_from(req.ttl.as_secs()).unwrap_or(i64::MAX);
        let not_before = now_secs - BACKDATE.as_secs() as i64;
        let not_after = now_secs.saturating_add(ttl).min(self.not_after_secs);
        let serial = random_serial();

        let mut p = CertificateParams::default();
        p.not_before = odt(not_before)?;
        p.not_after = odt(not_after)?;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.subject_alt_names = sans;
        p.distinguished_name = self.leaf_dn.clone();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        for ext in req.extensions {
            let mut custom = rcgen::CustomExtension::from_oid_content(&ext.oid, ext.value.clone());
            custom.set_criticality(false);
            p.custom_extensions.push(custom);
        }
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| sign_err(format!("signing the X.509-SVID: {e}")))?;

        let mut cert_chain = Vec::with_capacity(1 + self.chain_tail.len());
        cert_chain.push(cert.der().to_vec());
        cert_chain.extend(self.chain_tail.iter().cloned());
        Ok(IssuedX509Svid {
            spiffe_id: id.clone(),
            cert_chain,
            serial: serial_hex(&serial),
            not_before: from_unix_seconds(not_before),
            not_after: from_unix_seconds(not_after),
            authority_id: self.authority_id.clone(),
        })
    }

    /// An RFC 5280 (section 5) CRL signed by this CA: version 2, thisUpdate `now`,
    /// nextUpdate `now + CRL_NEXT_UPDATE`, the authority key identifier (section 5.2.1, equal
    /// to this CA's SKI so relying parties match it to the certificate) and the CRL number
    /// (section 5.2.3).
    pub fn crl(
        &self,
        revoked: &[RevokedSerial],
        crl_number: u64,
        now: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        let now_secs = unix_seconds(now);
        let next = now_secs.saturating_add(CRL_NEXT_UPDATE.as_secs() as i64);
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for r in revoked {
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&parse_serial_hex(&r.serial_hex)?),
                revocation_time: odt(unix_seconds(r.revoked_at))?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        // A CRL number is a non-negative INTEGER: big-endian bytes with no sign ambiguity.
        let mut number = vec![0u8];
        number.extend_from_slice(&crl_number.to_be_bytes());
        let params = rcgen::CertificateRevocationListParams {
            this_update: odt(now_secs)?,
            next_update: odt(next)?,
            crl_number: SerialNumber::from_slice(&number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::PreSpecified(self.ski.clone()),
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| sign_err(format!("signing the CRL: {e}")))?;
        Ok(crl.der().to_vec())
    }
}

/// How long a CRL is current: its nextUpdate is this long after its thisUpdate. Relying
/// parties treat a CRL past nextUpdate as stale (OpenSSL refuses it), so whoever publishes
/// CRLs re-fetches them well within this interval.
pub const CRL_NEXT_UPDATE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Parses a serial as `IssuedX509Svid::serial` spells it (lowercase or uppercase hex, at
/// most 20 octets, RFC 5280 section 4.1.2.2) into DER INTEGER content bytes.
pub(crate) fn parse_serial_hex(serial: &str) -> Result<Vec<u8>, CaError> {
    let bad = |reason: &str| CaError::InvalidSerial {
        serial: serial.to_owned(),
        reason: reason.to_owned(),
    };
    if serial.is_empty() {
        return Err(bad("empty"));
    }
    if serial.len() > 40 {
        return Err(bad("longer than 20 octets"));
    }
    let padded = if serial.len() % 2 == 1 {
        format!("0{serial}")
    } else {
        serial.to_owned()
    };
    let mut bytes = hex::decode(&padded).map_err(|_| bad("not hexadecimal"))?;
    // Keep the INTEGER positive: a leading byte with the top bit set gets a 0x00 before it.
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        bytes.insert(0, 0);
    }
    Ok(bytes)
}

/// A certificate's Subject Key Identifier, or (for a certificate without one) the RFC 5280
/// section 4.2.1.2 method (1) value: SHA-1 of the subjectPublicKey bits.
fn subject_key_id(cert: &X509Certificate<'_>) -> Vec<u8> {
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ki) =
            ext.parsed_extension()
        {
            return ki.0.to_vec();
        }
    }
    ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &cert.public_key().subject_public_key.data,
    )
    .as_ref()
    .to_vec()
}

/// The authority id (lowercase SKI hex) of a CA certificate.
pub(crate) fn authority_id_of(cert_der: &[u8]) -> Result<String, String> {
    Ok(hex::encode(subject_key_id(&parse_cert(cert_der)?)))
}
