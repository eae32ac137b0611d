//! The OAuth front door end to end (docs/oauth.md), checked by clients nobody here wrote:
//! PyJWT validating JWT-SVIDs through OIDC discovery, and an MCP tool server and client on
//! the official `mcp` SDK (examples/mcp/) that validate our access tokens with PyJWT and
//! the discovered JWKS. Real servers, node agents and Python processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentd_e2e::{
    free_port, interop_python, repo_path, run_json_client, wait_until, Env, Node, Server,
};
use anyhow::{bail, Context};
use serde_json::{json, Value};

const PLANNER: &str = "spiffe://example.org/agent/planner";
const ORCH: &str = "spiffe://example.org/agent/orchestrator";
const SCHED: &str = "spiffe://example.org/agent/scheduler";
const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const CLIENT_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The venv's python, with the OAuth test's packages importable (a missing one fails the
/// test, naming it).
fn python() -> anyhow::Result<PathBuf> {
    let py = interop_python()?;
    let out = Command::new(&py)
        .args(["-c", "import jwt, mcp, spiffe"])
        .output()?;
    if !out.status.success() {
        bail!(
            "the OAuth tests need PyJWT and mcp in {}; run `make tools`: {}",
            py.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(py)
}

/// A server with the front door on a free port; its issuer URL.
fn server_with_front_door(env: &Env) -> anyhow::Result<(Server, String)> {
    let port = free_port()?;
    let bind = format!("127.0.0.1:{port}");
    let server = Server::start_with(env, &["--oauth-bind-address", &bind])?;
    Ok((server, format!("https://{bind}")))
}

struct Client {
    py: PathBuf,
    ca: PathBuf,
}

impl Client {
    fn run(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut cmd = Command::new(&self.py);
        cmd.arg(repo_path("tests/interop/python/oauth_client.py"))
            .args(args)
            .arg("--ca-file")
            .arg(&self.ca);
        run_json_client(cmd, Duration::from_secs(30))
    }

    fn get(&self, url: &str) -> anyhow::Result<Value> {
        self.run(&["get", url])
    }

    /// POSTs a form; returns {"status", "body"}.
    fn post(&self, url: &str, form: &[(&str, &str)]) -> anyhow::Result<Value> {
        let pairs: Vec<String> = form.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["post", url];
        for p in &pairs {
            args.extend(["--form", p.as_str()]);
        }
        self.run(&args)
    }

    fn exchange(
        &self,
        issuer: &str,
        svid: &str,
        resource: &str,
        scope: &str,
    ) -> anyhow::Result<Value> {
        let mut form = vec![
            ("grant_type", EXCHANGE),
            ("subject_token", svid),
            ("subject_token_type", JWT_TYPE),
            ("resource", resource),
        ];
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        self.post(&format!("{issuer}/oauth2/token"), &form)
    }

    fn introspect(&self, issuer: &str, token: &str, caller: &str) -> anyhow::Result<Value> {
        self.post(
            &format!("{issuer}/oauth2/introspect"),
            &[
                ("token", token),
                ("client_assertion_type", CLIENT_JWT),
                ("client_assertion", caller),
            ],
        )
    }
}

/// A refusal with this RFC 6749 error code whose description holds `why`.
fn assert_refused(answer: &Value, code: &str, why: &str) {
    assert_eq!(
        answer["status"],
        if code == "invalid_client" { 401 } else { 400 },
        "{answer}"
    );
    assert_eq!(answer["body"]["error"], code, "{answer}");
    let d = answer["body"]["error_description"]
        .as_str()
        .unwrap_or_default();
    assert!(d.contains(why), "{why:?} not in {answer}");
}

/// A JWT-SVID from `node` for `audience` (of `spiffe_id`, or through `grant`).
fn jwt_svid(
    node: &Node,
    audience: &str,
    spiffe_id: Option<&str>,
    grant: Option<&str>,
) -> anyhow::Result<String> {
    jwt_svid_for(node, &[audience], spiffe_id, grant)
}

/// A JWT-SVID from `node` naming every one of `audiences`.
fn jwt_svid_for(
    node: &Node,
    audiences: &[&str],
    spiffe_id: Option<&str>,
    grant: Option<&str>,
) -> anyhow::Result<String> {
    let sock = node.socket_arg();
    let mut args = vec![
        "api",
        "fetch",
        "jwt",
        "--socket-path",
        &sock,
        "--output",
        "json",
    ];
    for a in audiences {
        args.extend(["--audience", a]);
    }
    if let Some(id) = spiffe_id {
        args.extend(["--spiffe-id", id]);
    }
    if let Some(g) = grant {
        args.extend(["--grant", g]);
    }
    let out = agentd_e2e::agentd(&args);
    if !out.status.success() {
        bail!("fetch jwt: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["svids"][0]["svid"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no JWT-SVID in {v}"))
}

/// A JWT's claims, read without verifying it (the servers under test verify).
fn jwt_claims(token: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The example MCP tool server, stopped on drop.
struct ToolServer {
    child: Child,
    url: String,
}

impl ToolServer {
    fn start(py: &Path, issuer: &str, port: u16, ca: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(py)
            .arg(repo_path("examples/mcp/tool_server.py"))
            .args(["--issuer", issuer, "--port", &port.to_string(), "--ca-file"])
            .arg(ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("tool server stdout")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let url = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["url"].as_str().map(str::to_string))
            .with_context(|| format!("tool server printed {line:?}"))?;
        let addr = format!("127.0.0.1:{port}");
        if !wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        }) {
            bail!("the MCP tool server does not listen on {addr}");
        }
        Ok(Self { child, url })
    }
}

impl Drop for ToolServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// examples/mcp/agent.py: exchanges a JWT-SVID and calls `tools`.
fn agent(
    py: &Path,
    node: &Node,
    mcp_url: &str,
    ca: &Path,
    extra: &[&str],
) -> anyhow::Result<Value> {
    let mut cmd = Command::new(py);
    cmd.arg(repo_path("examples/mcp/agent.py"))
        .args(["--mcp-url", mcp_url, "--ca-file"])
        .arg(ca)
        .args(extra)
        .env("SPIFFE_ENDPOINT_SOCKET", node.endpoint());
    run_json_client(cmd, Duration::from_secs(60))
}

/// Polls `f` for up to `within`; true once it holds.
fn within(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_agent_exchanges_its_jwt_svid_and_calls_only_the_mcp_tools_in_its_scope() -> anyhow::Result<()>
{
    let py = python()?;
    let env = Env::new();
    let (server, issuer) = server_with_front_door(&env)?;
    let ca = env.path().join("bundle.pem");
    server.write_bundle(&ca)?;
    let client = Client {
        py: py.clone(),
        ca: ca.clone(),
    };
    let mcp_port = free_port()?;
    let resource = format!("http://127.0.0.1:{mcp_port}/mcp");

    // Discovery: RFC 8414 metadata and the OpenID configuration name the issuer and the
    // endpoints under it; the JWKS holds the trust domain's JWT key.
    let meta = client.get(&format!("{issuer}/.well-known/oauth-authorization-server"))?;
    assert_eq!(meta["status"], 200, "{meta}");
    assert_eq!(meta["body"]["issuer"], issuer.as_str());
    assert_eq!(
        meta["body"]["token_endpoint"],
        format!("{issuer}/oauth2/token")
    );
    assert_eq!(
        meta["body"]["introspection_endpoint"],
        format!("{issuer}/oauth2/introspect")
    );
    assert_eq!(
        meta["body"]["grant_types_supported"],
        json!([EXCHANGE, "urn:ietf:params:oauth:grant-type:jwt-bearer"])
    );
    let oidc = client.get(&format!("{issuer}/.well-known/openid-configuration"))?;
    assert_eq!(oidc["body"]["issuer"], issuer.as_str());
    assert_eq!(
        oidc["body"]["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    let jwks = client.get(oidc["body"]["jwks_uri"].as_str().unwrap_or_default())?;
    assert_eq!(jwks["body"]["keys"][0]["alg"], "ES256", "{jwks}");
    assert_eq!(
        jwks["body"]["keys"].as_array().map(Vec::len),
        Some(1),
        "{jwks}"
    );

    let node = Node::start(&env, &server, "n1")?;
    let entry = server.register_own_uid(
        &node.spiffe_id,
        PLANNER,
        &[
            "--scope",
            "calendar:read",
            "--scope",
            "crm:read",
            "--resource",
            &resource,
        ],
    )?;
    // A relying party that introspects, with an identity of its own.
    server.register_own_uid(&node.spiffe_id, "spiffe://example.org/tool/rp", &[])?;
    node.wait_for_svid(PLANNER)?;
    node.wait_for_svid("spiffe://example.org/tool/rp")?;

    // A JWT-SVID for the issuer names it as iss, and PyJWT validates it through discovery.
    let svid = jwt_svid(&node, &issuer, Some(PLANNER), None)?;
    let checked = client.run(&[
        "validate-svid",
        "--issuer",
        &issuer,
        "--audience",
        &issuer,
        "--token",
        &svid,
    ])?;
    assert_eq!(checked["valid"], true, "{checked}");
    assert_eq!(checked["claims"]["sub"], PLANNER);
    assert_eq!(checked["claims"]["iss"], issuer.as_str());
    assert!(checked["claims"]["jti"].is_string() && checked["claims"]["iat"].is_i64());

    // The MCP example: the in-scope tool answers, the other is refused by the tool server.
    let tools = ToolServer::start(&py, &issuer, mcp_port, &ca)?;
    assert_eq!(tools.url, resource);
    let got = agent(
        &py,
        &node,
        &resource,
        &ca,
        &[
            "--scope",
            "calendar:read",
            "--tool",
            "calendar_read",
            "--tool",
            "crm_read",
        ],
    )?;
    assert_eq!(got["scope"], "calendar:read", "{got}");
    assert_eq!(
        got["tools"]["calendar_read"]["ok"]["caller"]["sub"], PLANNER,
        "{got}"
    );
    assert_eq!(
        got["tools"]["calendar_read"]["ok"]["caller"]["client_id"],
        PLANNER
    );
    let refused = got["tools"]["crm_read"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(refused.contains("needs scope crm:read"), "{got}");
    // The JWT bearer grant (SEP-1933) yields the same token.
    let bearer = agent(
        &py,
        &node,
        &resource,
        &ca,
        &["--grant", "jwt-bearer", "--tool", "crm_read"],
    )?;
    assert_eq!(bearer["scope"], "calendar:read crm:read", "{bearer}");
    assert!(bearer["tools"]["crm_read"]["ok"].is_object(), "{bearer}");

    // The exchange itself: an RFC 9068 token for the resource, within the SVID's life.
    let x = client.exchange(&issuer, &svid, &resource, "calendar:read")?;
    assert_eq!(x["status"], 200, "{x}");
    assert_eq!(
        x["body"]["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(x["body"]["token_type"], "Bearer");
    let expires_in = x["body"]["expires_in"].as_i64().unwrap_or(0);
    assert!((1..=300).contains(&expires_in), "{x}");
    let access = x["body"]["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // Refusals, each with its RFC 6749 / 8707 code.
    assert_refused(
        &client.exchange(&issuer, &svid, &resource, "payments:execute")?,
        "invalid_scope",
        "payments:execute is beyond",
    );
    assert_refused(
        &client.exchange(
            &issuer,
            &svid,
            &format!("http://127.0.0.1:{mcp_port}/mcp-admin"),
            "",
        )?,
        "invalid_target",
        "may not get tokens for",
    );
    let other_aud = jwt_svid(&node, "spiffe://example.org/some/tool", Some(PLANNER), None)?;
    assert_refused(
        &client.exchange(&issuer, &other_aud, &resource, "")?,
        "invalid_grant",
        "does not name this issuer",
    );
    // A JWT-SVID naming the issuer and another relying party: that party holds it too, and
    // must not be able to exchange it.
    let shared = jwt_svid_for(
        &node,
        &[&issuer, "spiffe://example.org/some/tool"],
        Some(PLANNER),
        None,
    )?;
    assert_refused(
        &client.exchange(&issuer, &shared, &resource, "")?,
        "invalid_grant",
        "for this issuer alone",
    );
    // `audience` is taken when it names the resource, refused when it names another; a
    // token asked for as a JWT is answered as one.
    let token_url = format!("{issuer}/oauth2/token");
    let with_audience = |audience: &str| {
        client.post(
            &token_url,
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", &svid),
                ("subject_token_type", JWT_TYPE),
                ("requested_token_type", JWT_TYPE),
                ("resource", &resource),
                ("audience", audience),
            ],
        )
    };
    let same = with_audience(&resource)?;
    assert_eq!(same["status"], 200, "{same}");
    assert_eq!(same["body"]["issued_token_type"], JWT_TYPE, "{same}");
    assert_refused(
        &with_audience("https://elsewhere.example/mcp")?,
        "invalid_target",
        "differs from resource",
    );
    server.register_own_uid(
        &node.spiffe_id,
        "spiffe://example.org/agent/brief",
        &[
            "--scope",
            "calendar:read",
            "--resource",
            &resource,
            "--jwt-svid-ttl",
            "2s",
        ],
    )?;
    node.wait_for_svid("spiffe://example.org/agent/brief")?;
    let brief = jwt_svid(
        &node,
        &issuer,
        Some("spiffe://example.org/agent/brief"),
        None,
    )?;
    std::thread::sleep(Duration::from_millis(2500));
    assert_refused(
        &client.exchange(&issuer, &brief, &resource, "")?,
        "invalid_grant",
        "expired",
    );

    // Another trust domain's JWT-SVID, naming our issuer, is not ours to exchange.
    let partner = Server::start_named(&env, "partner", &["--trust-domain", "partner.example"])?;
    let pnode = Node::start_in_domain(&env, &partner, "p1", "partner.example")?;
    partner.register_own_uid(&pnode.spiffe_id, "spiffe://partner.example/agent/x", &[])?;
    pnode.wait_for_svid("spiffe://partner.example/agent/x")?;
    let foreign = jwt_svid(&pnode, &issuer, None, None)?;
    assert_refused(
        &client.exchange(&issuer, &foreign, &resource, "")?,
        "invalid_grant",
        "not in trust domain example.org's bundle",
    );

    // Bad bodies: RFC 6749 errors, never a 500.
    assert_refused(
        &client.post(&token_url, &[("grant_type", EXCHANGE)])?,
        "invalid_request",
        "subject_token is required",
    );
    assert_refused(
        &client.post(&token_url, &[])?,
        "invalid_request",
        "grant_type is required",
    );
    assert_refused(
        &client.post(&token_url, &[("grant_type", "password")])?,
        "unsupported_grant_type",
        "password",
    );
    assert_refused(
        &client.post(
            &token_url,
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", &svid),
                ("subject_token_type", JWT_TYPE),
            ],
        )?,
        "invalid_target",
        "resource is required",
    );
    let huge = "a".repeat(20 * 1024);
    assert_refused(
        &client.post(
            &token_url,
            &[("grant_type", EXCHANGE), ("subject_token", &huge)],
        )?,
        "invalid_request",
        "subject_token",
    );
    let big_body = env.path().join("big");
    std::fs::write(
        &big_body,
        format!("grant_type={EXCHANGE}&{}", "x=1&".repeat(30_000)),
    )?;
    let big = client.run(&[
        "post",
        &token_url,
        "--body-file",
        big_body.to_str().unwrap_or_default(),
    ])?;
    assert_refused(&big, "invalid_request", "larger than");
    let json_body = env.path().join("json");
    std::fs::write(&json_body, "{\"grant_type\": \"x\"}")?;
    let wrong_type = client.run(&[
        "post",
        &token_url,
        "--content-type",
        "application/json",
        "--body-file",
        json_body.to_str().unwrap_or_default(),
    ])?;
    assert_refused(
        &wrong_type,
        "invalid_request",
        "is not application/x-www-form-urlencoded",
    );
    assert_refused(
        &client.post(
            &token_url,
            &[
                ("grant_type", EXCHANGE),
                ("subject_token", "a.b.c"),
                ("subject_token_type", JWT_TYPE),
                ("resource", &resource),
            ],
        )?,
        "invalid_grant",
        "subject_token",
    );
    assert_eq!(client.get(&token_url)?["status"], 405);

    // Introspection: the caller authenticates with a JWT-SVID; the token is active.
    let caller = jwt_svid(&node, &issuer, Some("spiffe://example.org/tool/rp"), None)?;
    let active = client.introspect(&issuer, &access, &caller)?;
    assert_eq!(active["body"]["active"], true, "{active}");
    assert_eq!(active["body"]["aud"], resource.as_str());
    assert_eq!(active["body"]["scope"], "calendar:read");
    let unauth = client.post(
        &format!("{issuer}/oauth2/introspect"),
        &[("token", &access)],
    )?;
    assert_refused(&unauth, "invalid_client", "client authentication");

    // Every token is audited with its resource, scopes and jti.
    let audit = server.cli_ok(&[
        "audit",
        "show",
        "--action",
        "oauth.token.issue",
        "--output",
        "json",
    ])?;
    let jti = active["body"]["jti"].as_str().unwrap_or_default();
    assert!(audit.contains(jti) && audit.contains(&resource), "{audit}");

    // Revoking a JWT-SVID by its jti covers the access tokens made from it, and only those.
    let second = jwt_svid(&node, &token_url, Some(PLANNER), None)?;
    let second_jti = jwt_claims(&second)?["jti"]
        .as_str()
        .map(str::to_string)
        .context("a JWT-SVID without a jti")?;
    let from_second = client.exchange(&issuer, &second, &resource, "calendar:read")?;
    let from_second = from_second["body"]["access_token"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no access token in {from_second}"))?;
    assert_eq!(
        client.introspect(&issuer, &from_second, &caller)?["body"]["active"],
        true
    );
    server.cli_ok(&[
        "revoke",
        "svid",
        "--serial",
        &second_jti,
        "--reason",
        "leak",
    ])?;
    let revoked_at = Instant::now();
    let inactive = within(Duration::from_secs(1), || {
        client
            .introspect(&issuer, &from_second, &caller)
            .map(|v| v["body"]["active"] == false)
            .unwrap_or(false)
    });
    assert!(
        inactive,
        "a token from JWT-SVID {second_jti} still active {:?} after revoke svid",
        revoked_at.elapsed()
    );
    assert_eq!(
        client.introspect(&issuer, &access, &caller)?["body"]["active"],
        true,
        "revoking one JWT-SVID reached a token made from another"
    );
    // The revocation lists the token's jti for relying parties that watch instead.
    let from_second_jti = jwt_claims(&from_second)?["jti"].clone();
    let listed = server.cli_ok(&["revoke", "list", "--output", "json"])?;
    assert!(
        listed.contains(from_second_jti.as_str().unwrap_or("?")),
        "{from_second_jti} not in {listed}"
    );

    // Revoking the entry: the next exchange is refused and introspection says inactive
    // within a second of the revoke command's return.
    server.cli_ok(&["revoke", "entry", "--id", &entry, "--reason", "test"])?;
    let revoked_at = Instant::now();
    let inactive = within(Duration::from_secs(1), || {
        client
            .introspect(&issuer, &access, &caller)
            .map(|v| v["body"]["active"] == false)
            .unwrap_or(false)
    });
    assert!(
        inactive,
        "still active {:?} after revoke entry",
        revoked_at.elapsed()
    );
    assert_refused(
        &client.exchange(&issuer, &svid, &resource, "")?,
        "invalid_grant",
        "revoked",
    );
    drop(tools);
    Ok(())
}

#[test]
fn a_delegated_identity_gets_a_token_naming_the_principal_and_the_agent_chain() -> anyhow::Result<()>
{
    let py = python()?;
    let env = Env::new();
    let (server, issuer) = server_with_front_door(&env)?;
    let ca = env.path().join("bundle.pem");
    server.write_bundle(&ca)?;
    let client = Client {
        py: py.clone(),
        ca: ca.clone(),
    };
    let mcp_port = free_port()?;
    let resource = format!("http://127.0.0.1:{mcp_port}/mcp");
    let n1 = Node::start(&env, &server, "n1")?;
    let n2 = Node::start(&env, &server, "n2")?;
    server.register_own_uid(
        &n1.spiffe_id,
        ORCH,
        &[
            "--scope",
            "calendar:*",
            "--scope",
            "crm:read",
            "--resource",
            &resource,
        ],
    )?;
    server.register_own_uid(
        &n2.spiffe_id,
        SCHED,
        &["--scope", "calendar:read", "--resource", &resource],
    )?;
    n1.wait_for_svid(ORCH)?;
    n2.wait_for_svid(SCHED)?;

    // A grant may narrow the entry's resources, never widen them.
    let wide = server.cli(&[
        "grant",
        "create",
        "--principal",
        "user:alice@example.com",
        "--agent",
        ORCH,
        "--scope",
        "calendar:read",
        "--resource",
        "https://elsewhere.example/",
    ]);
    assert!(!wide.status.success());
    assert!(
        String::from_utf8_lossy(&wide.stderr).contains("is not under a resource of"),
        "{}",
        String::from_utf8_lossy(&wide.stderr)
    );
    let g: Value = serde_json::from_str(&server.cli_ok(&[
        "grant",
        "create",
        "--output",
        "json",
        "--principal",
        "user:alice@example.com",
        "--agent",
        ORCH,
        "--scope",
        "calendar:*",
        "--ttl",
        "1h",
        "--max-depth",
        "1",
        "--resource",
        &resource,
    ])?)?;
    let root = g["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(g["resources"], json!([resource]));

    // alice -> orchestrator -> scheduler, through the node agents' delegation service.
    n1.wait_for_grant(&root)?;
    let child = n1.delegate_to(&n2, SCHED, "calendar:read", &root)?;
    let delegated = jwt_svid(&n2, &issuer, None, Some(&child))?;

    // The MCP tool sees alice as the subject, the scheduler acting for the orchestrator.
    let tools = ToolServer::start(&py, &issuer, mcp_port, &ca)?;
    let got = agent(
        &py,
        &n2,
        &tools.url,
        &ca,
        &[
            "--jwt-svid",
            &delegated,
            "--scope",
            "calendar:read",
            "--tool",
            "calendar_read",
        ],
    )?;
    let caller = &got["tools"]["calendar_read"]["ok"]["caller"];
    assert_eq!(caller["sub"], "user:alice@example.com", "{got}");
    assert_eq!(caller["client_id"], SCHED);
    assert_eq!(
        caller["act"],
        json!({"sub": SCHED, "act": {"sub": ORCH}}),
        "{got}"
    );
    // Beyond the child grant (crm:read is the orchestrator's entry's, not the grant's).
    assert_refused(
        &client.exchange(&issuer, &delegated, &resource, "crm:read")?,
        "invalid_scope",
        "crm:read is beyond",
    );

    let x = client.exchange(&issuer, &delegated, &resource, "calendar:read")?;
    let access = x["body"]["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let caller_svid = jwt_svid(&n1, &issuer, Some(ORCH), None)?;
    assert_eq!(
        client.introspect(&issuer, &access, &caller_svid)?["body"]["active"],
        true
    );

    // Revoking the root grant: introspection says inactive within a second, and the
    // delegated JWT-SVID is exchanged no more.
    server.cli_ok(&["revoke", "grant", "--id", &root, "--reason", "alice left"])?;
    let revoked_at = Instant::now();
    let inactive = within(Duration::from_secs(1), || {
        client
            .introspect(&issuer, &access, &caller_svid)
            .map(|v| v["body"]["active"] == false)
            .unwrap_or(false)
    });
    assert!(
        inactive,
        "still active {:?} after revoke grant",
        revoked_at.elapsed()
    );
    assert_refused(
        &client.exchange(&issuer, &delegated, &resource, "")?,
        "invalid_grant",
        "revoked",
    );
    drop(tools);
    Ok(())
}
