"""An agent that calls MCP tools with an agentd identity.

1. Fetches a JWT-SVID for the issuer from the node agent's Workload API (py-spiffe), or
   takes one given (a delegated JWT-SVID from `agentd api fetch jwt --grant ID`);
2. finds the tool server's authorization server (RFC 9728 protected resource metadata,
   then RFC 8414 metadata);
3. exchanges the JWT-SVID for an access token for the tool server (RFC 8693, or the RFC 7523
   JWT bearer grant with --grant jwt-bearer), asking for --scope;
4. calls each --tool through the official `mcp` client and prints one JSON line: the token
   response's scope and, per tool, its result or its error.

    python agent.py --mcp-url http://127.0.0.1:9000/mcp --ca-file bundle.pem \\
        --scope calendar:read --tool calendar_read --tool crm_read
"""

import argparse
import asyncio
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def get_json(url: str, ctx: ssl.SSLContext | None = None) -> dict:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return json.load(r)


def authorization_server(mcp_url: str, ctx: ssl.SSLContext) -> dict:
    """RFC 9728 section 3: the resource's metadata names its authorization servers."""
    u = urllib.parse.urlsplit(mcp_url)
    prm = get_json(f"{u.scheme}://{u.netloc}/.well-known/oauth-protected-resource{u.path}")
    issuer = prm["authorization_servers"][0].rstrip("/")
    meta = get_json(f"{issuer}/.well-known/oauth-authorization-server", ctx)
    if meta["issuer"] != issuer:
        raise SystemExit(f"metadata issuer {meta['issuer']!r} is not {issuer!r}")
    return {"resource": prm["resource"], **meta}


def fetch_jwt_svid(audience: str) -> str:
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(os.environ["SPIFFE_ENDPOINT_SOCKET"]) as c:
        return c.fetch_jwt_svid(audience={audience}).token


def exchange(meta: dict, svid: str, scope: str, grant: str, ctx: ssl.SSLContext) -> dict:
    if grant == "token-exchange":
        form = {"grant_type": TOKEN_EXCHANGE, "subject_token": svid, "subject_token_type": JWT_TYPE}
    else:
        form = {"grant_type": JWT_BEARER, "assertion": svid}
    form["resource"] = meta["resource"]
    if scope:
        form["scope"] = scope
    req = urllib.request.Request(
        meta["token_endpoint"],
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise SystemExit(json.dumps({"exchange_error": json.load(e), "status": e.code}))


async def call_tools(url: str, token: str, tools: list[str]) -> dict:
    results = {}
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            for name in tools:
                arg = {"calendar_read": {"day": "2026-12-02"}, "crm_read": {"account": "acme"}}.get(name, {})
                r = await client.call_tool(name, arg)
                text = " ".join(getattr(c, "text", "") for c in r.content)
                if r.is_error:
                    results[name] = {"error": text}
                else:
                    results[name] = {"ok": r.structured_content or json.loads(text)}
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mcp-url", required=True)
    p.add_argument("--ca-file", required=True)
    p.add_argument("--scope", default="")
    p.add_argument("--tool", action="append", default=[])
    p.add_argument("--grant", choices=["token-exchange", "jwt-bearer"], default="token-exchange")
    p.add_argument("--jwt-svid", help="a JWT-SVID to exchange instead of fetching one")
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.ca_file)
    meta = authorization_server(a.mcp_url, ctx)
    svid = a.jwt_svid or fetch_jwt_svid(meta["issuer"])
    tok = exchange(meta, svid, a.scope, a.grant, ctx)
    out = {"scope": tok.get("scope", ""), "expires_in": tok["expires_in"], "token_type": tok["token_type"]}
    out["tools"] = asyncio.run(call_tools(a.mcp_url, tok["access_token"], a.tool))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
