//! The bad-input sweep: one table per surface, each row a malformed or oversized input and the
//! field its error must name. Every row must be refused with a clear error, never a panic, and
//! leave nothing written: the admin rows go to a real server's admin API directly (the CLI's
//! own checks are not in the way), and afterwards the server is alive, holds no entry, token,
//! grant or revocation, and its audit log has no write. The CSR and JWT rows go through the
//! parsers the node API and the Workload API use.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd::ca::{check_csr_der, CaConfig, CertificateAuthority, JwtSvidParams, X509SvidParams};
use agentd::clock::ManualClock;
use agentd::keys::PrivateKey;
use agentd::svid::jwt;
use agentd_e2e::{Env, Server};
use agentd_proto::admin;
use agentd_proto::revocation::RevocationHandle;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use spiffe::{SpiffeId, TrustDomain};
use tokio::io::AsyncWriteExt;

const PARENT: &str = "spiffe://example.org/node/n1";

fn spec(spiffe_id: &str, selectors: &[&str]) -> admin::EntrySpec {
    admin::EntrySpec {
        spiffe_id: spiffe_id.into(),
        parent_id: PARENT.into(),
        selectors: selectors.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn good() -> admin::EntrySpec {
    spec("spiffe://example.org/agent/a", &["unix:uid:1000"])
}

fn with(f: impl FnOnce(&mut admin::EntrySpec)) -> admin::EntrySpec {
    let mut s = good();
    f(&mut s);
    s
}

fn revoke(kind: &str, id: &str, reason: &str) -> admin::RevokeRequest {
    admin::RevokeRequest {
        handle: Some(RevocationHandle {
            kind: kind.into(),
            id: id.into(),
        }),
        reason: reason.into(),
    }
}

/// A refusal must be InvalidArgument (or NotFound for an unknown handle), name the field,
/// and be short enough to print: a huge input is not echoed back whole.
fn assert_refused(row: &str, result: Result<(), tonic::Status>, field: &str) {
    let status = match result {
        Ok(()) => panic!("{row}: accepted, but must be refused naming {field}"),
        Err(s) => s,
    };
    assert!(
        matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::OutOfRange
        ),
        "{row}: {:?} {}",
        status.code(),
        status.message()
    );
    assert!(
        status.message().contains(field),
        "{row}: {:?} should name {field:?}",
        status.message()
    );
    assert!(
        status.message().len() < 1024,
        "{row}: a {}-byte message echoes the input",
        status.message().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_every_bad_field_naming_it_and_writes_nothing() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let mut client = agentd::cli::connect::admin_client(&server.admin_socket).await?;
    let long_path = format!("spiffe://example.org/{}", "a".repeat(3000));
    let huge = "x".repeat(2 * 1024 * 1024);

    let entry_rows: Vec<(&str, admin::EntrySpec, &str)> = vec![
        (
            "empty spiffe_id",
            with(|s| s.spiffe_id.clear()),
            "spiffe_id",
        ),
        (
            "no scheme",
            with(|s| s.spiffe_id = "example.org/a".into()),
            "spiffe_id",
        ),
        (
            "http scheme",
            with(|s| s.spiffe_id = "http://example.org/a".into()),
            "spiffe_id",
        ),
        (
            "a query",
            with(|s| s.spiffe_id = "spiffe://example.org/a?x=1".into()),
            "spiffe_id",
        ),
        (
            "a dot segment",
            with(|s| s.spiffe_id = "spiffe://example.org/a/../b".into()),
            "spiffe_id",
        ),
        (
            "a foreign trust domain",
            with(|s| s.spiffe_id = "spiffe://other.org/a".into()),
            "trust domain",
        ),
        (
            "over 2048 bytes",
            with(|s| s.spiffe_id = long_path.clone()),
            "spiffe_id",
        ),
        (
            "a reserved id",
            with(|s| s.spiffe_id = "spiffe://example.org/agentd/server".into()),
            "reserved",
        ),
        (
            "bad parent_id",
            with(|s| s.parent_id = "node/n1".into()),
            "parent_id",
        ),
        ("no selector", with(|s| s.selectors.clear()), "selector"),
        (
            "a selector without a colon",
            with(|s| s.selectors = vec!["nocolon".into()]),
            "selector",
        ),
        (
            "an unknown selector type",
            with(|s| s.selectors = vec!["nosuch:x".into()]),
            "selector",
        ),
        (
            "an empty selector value",
            with(|s| s.selectors = vec!["unix:".into()]),
            "selector",
        ),
        (
            "a 2 MiB selector",
            with(|s| s.selectors = vec![format!("unix:uid:{huge}")]),
            "selector",
        ),
        (
            "a negative x509 ttl",
            with(|s| s.x509_svid_ttl_seconds = -1),
            "x509_svid_ttl",
        ),
        (
            "a huge x509 ttl",
            with(|s| s.x509_svid_ttl_seconds = i64::MAX),
            "x509_svid_ttl",
        ),
        (
            "a negative jwt ttl",
            with(|s| s.jwt_svid_ttl_seconds = -5),
            "jwt_svid_ttl",
        ),
        (
            "a scope without a colon",
            with(|s| s.scopes = vec!["nocolon".into()]),
            "scope",
        ),
        (
            "an empty scope",
            with(|s| s.scopes = vec![String::new()]),
            "scope",
        ),
        (
            "a scope with a space",
            with(|s| s.scopes = vec!["crm:read all".into()]),
            "scope",
        ),
        (
            "a 2 MiB scope",
            with(|s| s.scopes = vec![format!("crm:{huge}")]),
            "scope",
        ),
        (
            "a bad dns name",
            with(|s| s.dns_names = vec!["bad_name".into()]),
            "dns_name",
        ),
        (
            "a bad owner",
            with(|s| s.owner = "no owner\n".into()),
            "owner",
        ),
    ];
    for (row, spec, field) in entry_rows {
        let result = client.create_entry(spec).await.map(|_| ());
        assert_refused(&format!("entry create: {row}"), result, field);
    }

    let token_rows: Vec<(&str, admin::CreateJoinTokenRequest, &str)> = vec![
        (
            "a bad spiffe_id",
            admin::CreateJoinTokenRequest {
                spiffe_id: "node/x".into(),
                ttl_seconds: 0,
            },
            "spiffe_id",
        ),
        (
            "a negative ttl",
            admin::CreateJoinTokenRequest {
                spiffe_id: "spiffe://example.org/node/x".into(),
                ttl_seconds: -1,
            },
            "ttl",
        ),
    ];
    for (row, req, field) in token_rows {
        let result = client.create_join_token(req).await.map(|_| ());
        assert_refused(&format!("token generate: {row}"), result, field);
    }

    let revoke_rows: Vec<(&str, admin::RevokeRequest, &str)> = vec![
        (
            "no handle",
            admin::RevokeRequest {
                handle: None,
                reason: "r".into(),
            },
            "handle",
        ),
        ("an unknown kind", revoke("everything", "x", "r"), "kind"),
        ("a non-hex serial", revoke("svid", "zz", "r"), "serial"),
        ("a bad node id", revoke("node", "n1", "r"), "spiffe_id"),
        ("a bad entry id", revoke("entry", "nope", "r"), "id"),
        ("a 2 MiB reason", revoke("svid", "0a", &huge), "reason"),
        (
            "a reason with a newline",
            revoke("svid", "0a", "one\ntwo"),
            "reason",
        ),
        (
            "an unknown authority",
            revoke("authority", "00", "r"),
            "authority",
        ),
    ];
    for (row, req, field) in revoke_rows {
        let result = client.revoke(req).await.map(|_| ());
        assert_refused(&format!("revoke: {row}"), result, field);
    }

    let grant_rows: Vec<(&str, admin::CreateGrantRequest, &str)> = vec![
        (
            "a bad principal",
            admin::CreateGrantRequest {
                principal: "alice".into(),
                agent: "spiffe://example.org/agent/a".into(),
                scopes: vec!["crm:read".into()],
                ..Default::default()
            },
            "principal",
        ),
        (
            "a bad agent",
            admin::CreateGrantRequest {
                principal: "user:alice@example.com".into(),
                agent: "agent/a".into(),
                scopes: vec!["crm:read".into()],
                ..Default::default()
            },
            "agent",
        ),
        (
            "a bad scope",
            admin::CreateGrantRequest {
                principal: "user:alice@example.com".into(),
                agent: "spiffe://example.org/agent/a".into(),
                scopes: vec!["nocolon".into()],
                ..Default::default()
            },
            "scope",
        ),
    ];
    for (row, req, field) in grant_rows {
        let result = client.create_grant(req).await.map(|_| ());
        assert_refused(&format!("grant create: {row}"), result, field);
    }

    // A message over the server's limit is refused as a whole, not half-read.
    let over_limit = with(|s| s.hint = "h".repeat(8 * 1024 * 1024));
    let status = client
        .create_entry(over_limit)
        .await
        .expect_err("an 8 MiB entry must be refused");
    assert!(
        matches!(
            status.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::InvalidArgument
        ),
        "{status:?}"
    );

    // A peer that hangs up mid-request: half a preface, then half a frame.
    for partial in [
        &b"PRI * HTTP/2.0\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x40\x01"[..],
    ] {
        let mut raw = tokio::net::UnixStream::connect(&server.admin_socket).await?;
        raw.write_all(partial).await?;
        drop(raw);
    }

    // Alive, and nothing was written by any of it.
    let mut client = agentd::cli::connect::admin_client(&server.admin_socket).await?;
    let entries = client
        .list_entries(admin::ListEntriesRequest::default())
        .await?
        .into_inner();
    assert!(entries.entries.is_empty(), "{entries:?}");
    let revocations = client
        .list_revocations(admin::ListRevocationsRequest {
            all: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(revocations.events.is_empty(), "{revocations:?}");
    assert_eq!(revocations.head_sequence, 0);
    let grants = client
        .list_grants(admin::ListGrantsRequest::default())
        .await?
        .into_inner();
    assert!(grants.grants.is_empty(), "{grants:?}");
    let audit = client
        .list_audit_records(admin::ListAuditRecordsRequest::default())
        .await?
        .into_inner();
    let writes: Vec<_> = audit
        .records
        .iter()
        .filter(|r| !r.action.starts_with("server.") && !r.action.starts_with("ca."))
        .map(|r| r.action.clone())
        .collect();
    assert!(
        writes.is_empty(),
        "audit records of refused writes: {writes:?}"
    );
    // The good entry still goes in: the refusals were about the input, not the server.
    client.create_entry(good()).await?;
    Ok(())
}

/// CSRs as the node API receives them in MintX509SVIDs and attestation.
#[test]
fn bad_csrs_are_refused_naming_the_defect() -> anyhow::Result<()> {
    let good = PrivateKey::generate()?.csr_der()?;
    check_csr_der(&good).expect("a P-256 CSR is accepted");

    let other_key = |alg: &'static rcgen::SignatureAlgorithm| -> anyhow::Result<Vec<u8>> {
        let key = rcgen::KeyPair::generate_for(alg)?;
        Ok(rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec())
    };
    let mut bad_signature = good.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    let mut huge = good.clone();
    huge.extend(std::iter::repeat_n(0u8, 1024 * 1024));

    let rows: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("empty", Vec::new(), &["csr"]),
        ("garbage", b"not a csr".to_vec(), &["csr"]),
        ("truncated", good[..good.len() / 2].to_vec(), &["csr"]),
        ("a bad signature", bad_signature, &["signature"]),
        (
            "an Ed25519 key",
            other_key(&rcgen::PKCS_ED25519)?,
            &["P-256", "key"],
        ),
        (
            "a P-384 key",
            other_key(&rcgen::PKCS_ECDSA_P384_SHA384)?,
            &["P-256", "key"],
        ),
        ("trailing bytes (1 MiB)", huge, &["csr"]),
    ];
    for (row, der, needles) in rows {
        let err = match check_csr_der(&der) {
            Ok(()) => panic!("CSR {row}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            needles
                .iter()
                .any(|n| err.to_lowercase().contains(&n.to_lowercase())),
            "CSR {row}: {err:?} should name one of {needles:?}"
        );
        assert!(err.len() < 512, "CSR {row}: {err}");
    }

    // Extra SANs and a subject in the CSR are not errors, and are not believed: the SVID
    // carries only the SPIFFE ID the server chose.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()])?;
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://example.org/agentd/server".try_into()?,
    ));
    let with_sans = params.serialize_request(&key)?.der().to_vec();
    let (_dir, ca, now) = ca()?;
    let svid = ca.sign_x509_svid(
        &X509SvidParams {
            csr_der: &with_sans,
            spiffe_id: &SpiffeId::new("spiffe://example.org/agent/a")?,
            ttl: Duration::from_secs(60),
            dns_names: &[],
            extensions: &[],
        },
        now,
    )?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.cert_chain[0])?;
    let sans: Vec<String> = leaf
        .subject_alternative_name()?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|n| n.to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(sans, ["URI(spiffe://example.org/agent/a)"], "{sans:?}");
    Ok(())
}

fn ca() -> anyhow::Result<(tempfile::TempDir, CertificateAuthority, SystemTime)> {
    let dir = tempfile::tempdir()?;
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let ca = CertificateAuthority::load_or_create(
        &CaConfig {
            trust_domain: TrustDomain::new("example.org")?,
            key_dir: dir.path().to_path_buf(),
            ca_ttl: Duration::from_secs(24 * 3600),
            upstream: None,
            organization: String::new(),
        },
        &ManualClock::new(now),
    )?;
    Ok((dir, ca, now))
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// JWT-SVIDs as ValidateJWTSVID and relying parties receive them.
#[test]
fn bad_jwts_are_refused_naming_the_defect() -> anyhow::Result<()> {
    let (dir, ca, now) = ca()?;
    let bundle = ca.bundle();
    let kid = ca.jwt_key_id();
    let key = PrivateKey::load(&dir.path().join(format!("jwt-{kid}.key")))?;
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        key.pkcs8_der(),
        &SystemRandom::new(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sign = |header: serde_json::Value, claims: serde_json::Value| -> String {
        let input = format!("{}.{}", b64(&header), b64(&claims));
        let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    };
    let t = |d: i64| (now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64) + d;
    let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let claims = |exp: i64, aud: &str| serde_json::json!({"sub": "spiffe://example.org/agent/a", "aud": aud, "exp": exp, "iat": t(0)});
    let good = ca
        .sign_jwt_svid(
            &JwtSvidParams {
                spiffe_id: &SpiffeId::new("spiffe://example.org/agent/a")?,
                audience: &["tool".to_string()],
                ttl: Duration::from_secs(300),
                claims: None,
            },
            now,
        )?
        .token;
    jwt::validate(&good, "tool", &bundle, now).expect("a fresh token validates");
    let body = good.split('.').nth(1).unwrap_or_default().to_string();
    let none_header = b64(&serde_json::json!({"alg": "none", "typ": "JWT"}));
    let hs_header = b64(&serde_json::json!({"alg": "HS256", "kid": kid, "typ": "JWT"}));

    let rows: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "token"),
        ("two parts", "a.b".into(), "token"),
        (
            "alg none",
            format!("{none_header}.{body}.c2lnbmF0dXJl"),
            "alg",
        ),
        (
            "alg HS256",
            format!("{hs_header}.{body}.c2lnbmF0dXJl"),
            "alg",
        ),
        (
            "an unknown kid",
            sign(
                serde_json::json!({"alg": "ES256", "kid": "nosuch", "typ": "JWT"}),
                claims(t(60), "tool"),
            ),
            "nosuch",
        ),
        (
            "expired",
            sign(header.clone(), claims(t(-1), "tool")),
            "expired",
        ),
        (
            "another audience",
            sign(header.clone(), claims(t(60), "other")),
            "audience",
        ),
        (
            "a foreign subject",
            sign(
                header.clone(),
                serde_json::json!({"sub": "spiffe://other.org/a", "aud": "tool", "exp": t(60)}),
            ),
            "sub",
        ),
        (
            "no exp",
            sign(
                header.clone(),
                serde_json::json!({"sub": "spiffe://example.org/a", "aud": "tool"}),
            ),
            "exp",
        ),
        (
            "a tampered payload",
            format!(
                "{}.{}.{}",
                good.split('.').next().unwrap_or_default(),
                b64(&claims(t(3600), "tool")),
                good.split('.').nth(2).unwrap_or_default()
            ),
            "signature",
        ),
        (
            "oversized",
            format!("{good}{}", "A".repeat(jwt::MAX_TOKEN_LEN)),
            "limit",
        ),
    ];
    for (row, token, needle) in rows {
        let err = match jwt::validate(&token, "tool", &bundle, now) {
            Ok(v) => panic!("JWT {row}: accepted as {}", v.spiffe_id),
            Err(e) => e.to_string(),
        };
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "JWT {row}: {err:?} should name {needle:?}"
        );
        assert!(err.len() < 1024, "JWT {row}: {} bytes", err.len());
    }
    Ok(())
}
