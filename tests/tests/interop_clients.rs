//! The Workload API with every mainstream client, whatever `:authority` each sends on a Unix
//! socket: py-spiffe and raw grpcio (C-core: the percent-encoded socket path), Node's grpc-js
//! (`localhost`), a hand-made HTTP/2 request with the raw path (what grpc-java sends), and
//! random or truncated framing that must not hurt the node agent. The clients are installed
//! by `scripts/install-tools.sh` (`make test` runs it); a missing one fails the test.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use agentd_e2e::{
    interop_node, interop_python, repo_path, run_json_client, serial_of, Env, Node, Server,
};
use anyhow::{bail, Context};
use prost::Message;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);

fn python(mode: &str, node: &Node, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(interop_python()?);
    cmd.arg(repo_path("tests/interop/python/workload_api.py"))
        .arg(mode)
        .arg(node.endpoint())
        .args(args);
    run_json_client(cmd, CLIENT_TIMEOUT)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn py_spiffe_fetches_two_svids_bundles_and_jwts() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let first = "spiffe://example.org/myservice";
    let second = "spiffe://example.org/myservice2";
    // As the spiffe crate's CI sets up SPIRE: both entries federate with
    // example-federated.org, whose bundle (X.509 only) is set by hand.
    let federated = agentd_e2e::foreign_ca_pem(env.path(), "example-federated.org")?;
    server.cli_ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "example-federated.org",
        "--path",
        &federated.display().to_string(),
    ])?;
    let fed = ["--federates-with", "example-federated.org"];
    server.register_own_uid(
        &node.spiffe_id,
        first,
        &["--hint", "myservice", fed[0], fed[1]],
    )?;
    server.register_own_uid(
        &node.spiffe_id,
        second,
        &["--hint", "myservice2", fed[0], fed[1]],
    )?;
    node.wait_for_svid(first)?;
    node.wait_for_svid(second)?;

    let x = python("x509", &node, &[])?;
    let mut ids = strings(&x["context_ids"]);
    ids.sort();
    assert_eq!(ids, [first, second], "{x}");
    let default = x["context_default"].as_str().unwrap_or_default();
    assert!([first, second].contains(&default), "{x}");
    assert_eq!(x["default_id"], x["context_default"], "{x}");
    assert!(x["default_chain_len"].as_u64() >= Some(1), "{x}");
    // The federated bundle is in fetch_x509_context().x509_bundle_set and in
    // fetch_x509_bundles(); the JWT bundles hold none for it (it has no JWT keys).
    assert_eq!(
        strings(&x["context_bundle_tds"]),
        ["example-federated.org", "example.org"],
        "{x}"
    );
    assert_eq!(
        strings(&x["bundle_tds"]),
        ["example-federated.org", "example.org"],
        "{x}"
    );
    assert!(x["bundle_authorities"].as_u64() >= Some(1), "{x}");

    let j = python("jwt", &node, &["my_audience"])?;
    let jwt_id = j["jwt_id"].as_str().unwrap_or_default();
    assert!([first, second].contains(&jwt_id), "{j}");
    assert_eq!(strings(&j["jwt_audience"]), ["my_audience"], "{j}");
    assert_eq!(j["validated_id"], j["jwt_id"], "{j}");
    assert_eq!(j["checked_id"], j["jwt_id"], "{j}");
    assert_eq!(
        j["other_audience_error"], "ValidateJwtSvidError",
        "the node agent refuses another audience: {j}"
    );
    assert_eq!(strings(&j["jwt_bundle_tds"]), ["example.org"], "{j}");
    assert!(j["jwt_bundle_keys"].as_u64() >= Some(1), "{j}");
    Ok(())
}

#[test]
fn py_spiffe_x509_source_sees_a_rotation_on_its_open_stream() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/py-rotating";
    server.register_own_uid(&node.spiffe_id, id, &["--x509-svid-ttl", "6s"])?;
    node.wait_for_svid(id)?;

    // 6 s lifetime: rotation at about half-life.
    let r = python("rotation", &node, &["30"])?;
    assert_eq!(r["id"], id, "{r}");
    assert_eq!(r["closed"], false, "{r}");
    assert_ne!(
        r["first_serial"], r["second_serial"],
        "no new SVID on the open stream within 30 s: {r}"
    );
    Ok(())
}

#[test]
fn raw_grpcio_gets_the_statuses_the_spec_names() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    // No entry for this caller.
    let node = Node::start(&env, &server, "n1")?;

    let r = python("raw-grpcio", &node, &[])?;
    assert_eq!(r["without_header"]["code"], "INVALID_ARGUMENT", "{r}");
    assert_eq!(r["with_header"]["code"], "PERMISSION_DENIED", "{r}");
    assert_eq!(r["with_header"]["details"], "no identity issued", "{r}");
    Ok(())
}

#[test]
fn node_grpc_js_fetches_x509_and_validates_a_jwt() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/node-js";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;

    let mut cmd = interop_node()?;
    cmd.arg(repo_path("tests/interop/node/workload_api.js"))
        .arg(node.endpoint())
        .arg(repo_path("proto/workload.proto"))
        .arg("my_audience");
    let r = run_json_client(cmd, CLIENT_TIMEOUT)?;
    assert_eq!(strings(&r["x509_ids"]), [id], "{r}");
    assert!(r["x509_cert_bytes"].as_u64() > Some(100), "{r}");
    assert!(r["x509_key_bytes"].as_u64() > Some(50), "{r}");
    assert!(r["x509_bundle_bytes"].as_u64() > Some(100), "{r}");
    assert_eq!(strings(&r["jwt_ids"]), [id], "{r}");
    assert_eq!(r["validated_id"], id, "{r}");
    assert_eq!(r["validated_sub"], id, "{r}");
    assert_eq!(r["other_audience"], "INVALID_ARGUMENT", "{r}");
    assert_eq!(r["no_header"], "INVALID_ARGUMENT", "{r}");
    Ok(())
}

#[test]
fn the_python_example_prints_its_svid() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/python-example";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;

    let mut cmd = Command::new(interop_python()?);
    cmd.arg(repo_path("examples/python/fetch.py"))
        .arg("--json")
        .env("SPIFFE_ENDPOINT_SOCKET", node.endpoint());
    let r = run_json_client(cmd, CLIENT_TIMEOUT)?;
    assert_eq!(r["spiffe_id"], id, "{r}");
    assert_eq!(r["jwt_subject"], id, "{r}");
    assert_eq!(
        r["trust_domains"],
        serde_json::json!(["example.org"]),
        "{r}"
    );
    Ok(())
}

// --- HTTP/2 by hand ---------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn read_frame(s: &mut UnixStream) -> anyhow::Result<(u8, u8, u32, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).context("reading a frame header")?;
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).context("reading a frame")?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Ok((h[3], h[4], stream, payload))
}

/// Response headers and trailers, in order.
type Headers = Vec<(String, String)>;

/// A unary gRPC call written frame by frame, with `authority` as the client's `:authority`
/// (or none). Returns the response headers and trailers, and the response message.
fn raw_unary(
    socket: &std::path::Path,
    authority: Option<&str>,
    security_header: bool,
    path: &str,
    message: &[u8],
) -> anyhow::Result<(Headers, Vec<u8>)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    if security_header {
        fields.push(("workload.spiffe.io", "true"));
    }
    if let Some(a) = authority {
        fields.insert(3, (":authority", a));
    }
    let block = loona_hpack::Encoder::new()
        .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &block));
    out.extend(frame(DATA, END_STREAM, 1, &body));
    s.write_all(&out)?;

    let mut decoder = loona_hpack::Decoder::new();
    let mut headers = Vec::new();
    let mut data = Vec::new();
    loop {
        let (kind, flags, stream, payload) = read_frame(&mut s)?;
        match kind {
            SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[]))?,
            HEADERS if stream == 1 => {
                anyhow::ensure!(flags & END_HEADERS != 0, "CONTINUATION not expected here");
                for (n, v) in decoder
                    .decode(&payload)
                    .map_err(|e| anyhow::anyhow!("response headers: {e}"))?
                {
                    headers.push((
                        String::from_utf8_lossy(&n).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    ));
                }
                if flags & END_STREAM != 0 {
                    break;
                }
            }
            DATA if stream == 1 => data.extend_from_slice(&payload),
            RST_STREAM => bail!(
                "the server reset the stream: error code {}",
                u32::from_be_bytes(payload[..4].try_into()?)
            ),
            GOAWAY => bail!(
                "the server sent GOAWAY: error code {}",
                u32::from_be_bytes(payload[4..8].try_into()?)
            ),
            _ => {}
        }
    }
    let message = if data.len() >= 5 {
        data[5..].to_vec()
    } else {
        Vec::new()
    };
    Ok((headers, message))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_request_whose_authority_is_the_raw_socket_path_succeeds() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/raw-h2";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;

    let raw_path = node.socket_arg();
    let percent = raw_path.replace('/', "%2F");
    let request = agentd_proto::workload::JwtsvidRequest {
        audience: vec!["my_audience".into()],
        spiffe_id: String::new(),
    }
    .encode_to_vec();
    for authority in [
        Some(raw_path.as_str()), // grpc-java, grpc-swift
        Some(percent.as_str()),  // grpc C-core
        Some("localhost"),       // grpc-go, grpc-js
        None,
    ] {
        let (headers, message) = raw_unary(
            &node.socket,
            authority,
            true,
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            &request,
        )
        .with_context(|| format!(":authority {authority:?}"))?;
        assert_eq!(header(&headers, ":status"), Some("200"), "{headers:?}");
        assert_eq!(
            header(&headers, "grpc-status"),
            Some("0"),
            ":authority {authority:?}: {headers:?}"
        );
        let response = agentd_proto::workload::JwtsvidResponse::decode(&message[..])?;
        assert_eq!(response.svids.len(), 1);
        assert_eq!(response.svids[0].spiffe_id, id);
    }

    // The security header check still applies behind the rewrite (InvalidArgument = 3).
    let (headers, _) = raw_unary(
        &node.socket,
        Some(&raw_path),
        false,
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        &request,
    )?;
    assert_eq!(header(&headers, "grpc-status"), Some("3"), "{headers:?}");
    Ok(())
}

#[test]
fn the_admin_socket_accepts_a_raw_path_authority_too() -> anyhow::Result<()> {
    let env = Env::new();
    let server = Server::start(&env)?;
    let raw_path = server.admin_socket.display().to_string();
    // Admin.ListEntries with an empty request: the admin API answers (an empty list).
    let (headers, _) = raw_unary(
        &server.admin_socket,
        Some(&raw_path),
        false,
        "/agentd.admin.v1.Admin/ListEntries",
        &[],
    )?;
    assert_eq!(header(&headers, ":status"), Some("200"), "{headers:?}");
    assert_eq!(header(&headers, "grpc-status"), Some("0"), "{headers:?}");
    Ok(())
}

/// Random bytes, truncated prefaces, random frames and HEADERS blocks that do not decode, on
/// many connections: the node agent answers each with a connection error at worst, keeps
/// serving a real client in between, and never panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_truncated_http2_on_the_workload_socket_hurts_nobody() -> anyhow::Result<()> {
    use rand::{Rng, RngCore, SeedableRng};

    let env = Env::new();
    let server = Server::start(&env)?;
    let mut node = Node::start(&env, &server, "n1")?;
    let id = "spiffe://example.org/agent/fuzzed";
    server.register_own_uid(&node.spiffe_id, id, &[])?;
    node.wait_for_svid(id)?;

    let valid_headers = loona_hpack::Encoder::new().encode(
        [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchJWTSVID"),
            (b":authority", b"%2Ftmp%2Fx.sock"),
            (b"workload.spiffe.io", b"true"),
        ]
        .into_iter(),
    );
    let seed = std::env::var("AGENTD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let rounds: usize = std::env::var("AGENTD_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        let mut input = Vec::new();
        match round % 6 {
            // Random bytes from the start.
            0 => {
                input.resize(rng.random_range(0..2048), 0);
                rng.fill_bytes(&mut input);
            }
            // A truncated preface.
            1 => input.extend_from_slice(&PREFACE[..rng.random_range(0..PREFACE.len())]),
            // Random frames after the preface.
            2 => {
                input.extend_from_slice(PREFACE);
                for _ in 0..rng.random_range(1..8) {
                    let mut payload = vec![0; rng.random_range(0..512)];
                    rng.fill_bytes(&mut payload);
                    input.extend(frame(rng.random(), rng.random(), rng.random(), &payload));
                }
            }
            // HEADERS whose block is random bytes.
            3 => {
                input.extend_from_slice(PREFACE);
                let mut block = vec![0; rng.random_range(0..1024)];
                rng.fill_bytes(&mut block);
                input.extend(frame(
                    HEADERS,
                    END_HEADERS | (rng.random::<u8>() & 0x29),
                    1,
                    &block,
                ));
            }
            // A valid request with bytes flipped, cut at a random point.
            4 => {
                input.extend_from_slice(PREFACE);
                input.extend(frame(SETTINGS, 0, 0, &[]));
                input.extend(frame(HEADERS, END_HEADERS, 1, &valid_headers));
                input.extend(frame(DATA, END_STREAM, 1, b"\0\0\0\0\x05\x0a\x03abc"));
                for _ in 0..rng.random_range(0..4) {
                    let at = rng.random_range(0..input.len());
                    input[at] ^= rng.random::<u8>();
                }
                input.truncate(rng.random_range(PREFACE.len()..=input.len()));
            }
            // A frame header that announces a huge HEADERS frame, then silence.
            _ => {
                input.extend_from_slice(PREFACE);
                input.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1]);
            }
        }
        let mut s = UnixStream::connect(&node.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        // The server may close while we write; that is a fine answer.
        let _ = s.write_all(&input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        anyhow::ensure!(
            sink.len() < 1 << 20,
            "round {round}: {} bytes back",
            sink.len()
        );

        if round % 50 == 49 {
            assert!(node.daemon.is_running(), "round {round}: node agent died");
            let client = spiffe::WorkloadApiClient::connect_to(node.endpoint()).await?;
            let svid = client.fetch_jwt_svid(["my_audience"], None).await?;
            assert_eq!(svid.spiffe_id().to_string(), id, "round {round}");
        }
    }
    assert!(node.daemon.is_running(), "node agent died");
    let source = agentd_e2e::x509_source(&node).await?;
    assert_eq!(source.svid()?.spiffe_id().to_string(), id);
    assert!(!serial_of(source.svid()?.leaf().as_bytes()).is_empty());
    source.shutdown().await;
    let log = node.daemon.log_text();
    assert!(!log.contains("panicked"), "the node agent panicked:\n{log}");
    Ok(())
}
