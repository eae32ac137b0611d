//! What a foreign trust domain's bundle must be before the server stores it and hands it to
//! workloads: small, parseable (SPIFFE Trust Domain and Bundle spec, section 4, or PEM), with
//! at least one key, and no X.509 authority naming another trust domain. The same checks for
//! a bundle an operator supplies and one a bundle endpoint serves.

use spiffe::TrustDomain;

use crate::bundle::Bundle;

/// Largest bundle document accepted, from a file or an endpoint. A bundle of a few dozen
/// authorities is a few tens of KiB.
pub const MAX_FEDERATED_BUNDLE_BYTES: usize = 512 * 1024;
/// Most keys (X.509 and JWT authorities together) in one federated bundle.
pub const MAX_FEDERATED_KEYS: usize = 64;

/// The formats a bundle is supplied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// PEM CA certificates (X.509 authorities only).
    Pem,
    /// The SPIFFE bundle format (a JWKS document).
    Spiffe,
}

impl std::str::FromStr for BundleFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pem" => Ok(Self::Pem),
            "spiffe" => Ok(Self::Spiffe),
            other => Err(format!("{other:?} is not a bundle format (pem or spiffe)")),
        }
    }
}

/// Why a bundle was refused; the last good one (if any) stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleRejected {
    /// Larger than [`MAX_FEDERATED_BUNDLE_BYTES`].
    #[error("the bundle is {size} bytes or more, over the limit of {limit}")]
    Oversized { size: usize, limit: usize },
    /// Not a bundle document in the expected format.
    #[error("not a bundle: {reason}")]
    Malformed { reason: String },
    /// Neither X.509 nor JWT authorities: storing it would cut every workload off the
    /// trust domain, so it is refused rather than taken as "all revoked".
    #[error("the bundle holds no keys")]
    NoKeys,
    #[error("the bundle holds {count} keys, over the limit of {limit}")]
    TooManyKeys { count: usize, limit: usize },
    /// An X.509 authority whose SPIFFE ID names another trust domain.
    #[error("X.509 authority {index} is a CA of {found}, not of {expected}")]
    WrongTrustDomain {
        index: usize,
        found: String,
        expected: String,
    },
}

impl BundleRejected {
    /// A short name for logs and the audit trail.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::Malformed { .. } => "malformed",
            Self::NoKeys => "no_keys",
            Self::TooManyKeys { .. } => "too_many_keys",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
        }
    }
}

/// Parses and checks a bundle of `trust_domain`.
pub fn parse_bundle(
    trust_domain: &TrustDomain,
    format: BundleFormat,
    data: &[u8],
) -> Result<Bundle, BundleRejected> {
    if data.len() > MAX_FEDERATED_BUNDLE_BYTES {
        return Err(BundleRejected::Oversized {
            size: data.len(),
            limit: MAX_FEDERATED_BUNDLE_BYTES,
        });
    }
    let text = std::str::from_utf8(data).map_err(|_| BundleRejected::Malformed {
        reason: "not UTF-8 text".into(),
    })?;
    let malformed = |e: crate::bundle::BundleError| BundleRejected::Malformed {
        reason: e.to_string(),
    };
    let bundle = match format {
        BundleFormat::Pem => {
            if !text.trim_start().starts_with("-----BEGIN") {
                return Err(BundleRejected::Malformed {
                    reason: "no PEM certificate in it".into(),
                });
            }
            Bundle {
                trust_domain: trust_domain.clone(),
                x509_authorities: Bundle::x509_authorities_from_pem(text).map_err(malformed)?,
                jwt_authorities: Vec::new(),
                sequence: 0,
                refresh_hint: crate::bundle::DEFAULT_REFRESH_HINT,
            }
        }
        BundleFormat::Spiffe => {
            if text.trim_start().starts_with("-----BEGIN") {
                return Err(BundleRejected::Malformed {
                    reason: "PEM given where a SPIFFE bundle (JSON) was expected".into(),
                });
            }
            Bundle::from_spiffe_json(trust_domain.clone(), text).map_err(malformed)?
        }
    };
    check_bundle(trust_domain, &bundle)?;
    Ok(bundle)
}

/// The checks on a parsed bundle.
pub fn check_bundle(trust_domain: &TrustDomain, bundle: &Bundle) -> Result<(), BundleRejected> {
    let count = bundle.x509_authorities.len() + bundle.jwt_authorities.len();
    if count == 0 {
        return Err(BundleRejected::NoKeys);
    }
    if count > MAX_FEDERATED_KEYS {
        return Err(BundleRejected::TooManyKeys {
            count,
            limit: MAX_FEDERATED_KEYS,
        });
    }
    for (index, der) in bundle.x509_authorities.iter().enumerate() {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| BundleRejected::Malformed {
                reason: format!("X.509 authority {index}: {e}"),
            })?;
        // A SPIFFE CA names its trust domain in a URI SAN (X509-SVID spec, section 5.1); one
        // naming another domain is that domain's CA, served here by mistake or malice.
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            continue;
        };
        for name in &san.value.general_names {
            let x509_parser::extensions::GeneralName::URI(uri) = name else {
                continue;
            };
            // URI schemes are case-insensitive (RFC 3986, section 3.1).
            let Some(rest) = uri
                .get(..9)
                .filter(|p| p.eq_ignore_ascii_case("spiffe://"))
                .map(|_| &uri[9..])
            else {
                continue;
            };
            let found = rest.split('/').next().unwrap_or_default();
            if found != trust_domain.as_str() {
                return Err(BundleRejected::WrongTrustDomain {
                    index,
                    found: format!("spiffe://{found}"),
                    expected: trust_domain.id_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    /// A CA certificate of `domain` (URI SAN spiffe://domain), PEM.
    fn ca_pem(domain: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{domain}").try_into().unwrap(),
        )];
        p.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_pem_bundle_of_the_domain_is_accepted_in_both_formats() {
        let pem = ca_pem("partner.example");
        let b = parse_bundle(&td("partner.example"), BundleFormat::Pem, pem.as_bytes()).unwrap();
        assert_eq!(b.x509_authorities.len(), 1);
        let json = b.to_spiffe_json();
        let again = parse_bundle(
            &td("partner.example"),
            BundleFormat::Spiffe,
            json.as_bytes(),
        )
        .unwrap();
        assert_eq!(again.x509_authorities, b.x509_authorities);
    }

    #[test]
    fn a_ca_of_another_trust_domain_is_refused() {
        let pem = ca_pem("evil.example");
        let err =
            parse_bundle(&td("partner.example"), BundleFormat::Pem, pem.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "wrong_trust_domain", "{err}");
        assert!(err.to_string().contains("spiffe://evil.example"), "{err}");
    }

    #[test]
    fn empty_oversized_and_malformed_bundles_are_refused() {
        let d = td("partner.example");
        let empty = r#"{"keys":[],"spiffe_sequence":3}"#;
        assert_eq!(
            parse_bundle(&d, BundleFormat::Spiffe, empty.as_bytes()),
            Err(BundleRejected::NoKeys)
        );
        let huge = vec![b' '; MAX_FEDERATED_BUNDLE_BYTES + 1];
        assert_eq!(
            parse_bundle(&d, BundleFormat::Spiffe, &huge)
                .unwrap_err()
                .reason(),
            "oversized"
        );
        for bad in [&b"{not json"[..], b"\xff\xfe", b"[]", b"plain text"] {
            let err = parse_bundle(&d, BundleFormat::Spiffe, bad).unwrap_err();
            assert_eq!(err.reason(), "malformed", "{bad:?}: {err}");
        }
        let err = parse_bundle(&d, BundleFormat::Pem, b"{\"keys\":[]}").unwrap_err();
        assert_eq!(err.reason(), "malformed");
        let err = parse_bundle(
            &d,
            BundleFormat::Spiffe,
            ca_pem("partner.example").as_bytes(),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn too_many_keys_are_refused() {
        let pem: String = (0..=MAX_FEDERATED_KEYS)
            .map(|_| ca_pem("partner.example"))
            .collect();
        let err =
            parse_bundle(&td("partner.example"), BundleFormat::Pem, pem.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "too_many_keys", "{err}");
    }
}
