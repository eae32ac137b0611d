"""An MCP tool server that accepts agentd access tokens, built on the official `mcp` SDK.

It is an OAuth 2.1 resource server as the MCP authorization spec describes: it publishes
protected resource metadata (RFC 9728) naming agentd's issuer as its authorization
server, and validates bearer tokens with PyJWT against the JWKS it finds through agentd's
RFC 8414 metadata: signature (ES256), `typ: at+jwt`, `iss`, `aud` = its own URL (RFC 8707,
no token passthrough), `exp`. Each tool needs one scope.

    python tool_server.py --issuer https://127.0.0.1:8443 --port 9000 --ca-file bundle.pem

Prints one JSON line when it serves: {"url": "http://127.0.0.1:9000/mcp"}.
"""

import argparse
import json
import ssl
import sys
import urllib.request

import jwt
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# The scope each tool needs.
TOOL_SCOPES = {"calendar_read": "calendar:read", "crm_read": "crm:read"}


def discover(issuer: str, ctx: ssl.SSLContext) -> dict:
    """RFC 8414 section 3: the metadata of the issuer, which must name itself."""
    with urllib.request.urlopen(f"{issuer}/.well-known/oauth-authorization-server", context=ctx, timeout=10) as r:
        meta = json.load(r)
    if meta.get("issuer") != issuer:
        raise SystemExit(f"metadata issuer {meta.get('issuer')!r} is not {issuer!r}")
    return meta


class AgentdTokenVerifier:
    """Validates agentd's RFC 9068 access tokens with PyJWT and the discovered JWKS."""

    def __init__(self, issuer: str, resource: str, ctx: ssl.SSLContext):
        self.issuer = issuer
        self.resource = resource
        self.jwks = jwt.PyJWKClient(discover(issuer, ctx)["jwks_uri"], ssl_context=ctx, cache_keys=True)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            if jwt.get_unverified_header(token).get("typ", "").lower() not in ("at+jwt", "application/at+jwt"):
                return None
            key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["ES256"],
                issuer=self.issuer,
                audience=self.resource,
                options={"require": ["iss", "aud", "exp", "iat", "sub", "client_id", "jti"]},
            )
        except jwt.PyJWTError as e:
            print(f"token refused: {e}", file=sys.stderr, flush=True)
            return None
        return AccessToken(
            token=token,
            client_id=claims["client_id"],
            scopes=claims.get("scope", "").split(),
            expires_at=claims["exp"],
            resource=self.resource,
            subject=claims["sub"],
            claims=claims,
        )


def caller(tool: str) -> dict:
    """Who called, and whether the token's scopes allow `tool`."""
    token = get_access_token()
    if token is None:
        raise ToolError("no access token")
    needed = TOOL_SCOPES[tool]
    if needed not in token.scopes:
        raise ToolError(f"{tool} needs scope {needed}; the token has {' '.join(token.scopes) or 'none'}")
    claims = token.claims or {}
    return {"sub": token.subject, "client_id": token.client_id, "act": claims.get("act"), "scope": needed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--issuer", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca-file", required=True, help="PEM roots for the issuer's certificate")
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.ca_file)
    url = f"http://{a.host}:{a.port}/mcp"
    server = MCPServer(
        "agentd-example-tools",
        token_verifier=AgentdTokenVerifier(a.issuer, url, ctx),
        auth=AuthSettings(issuer_url=a.issuer, resource_server_url=url, validate_token_resource=True),
    )

    @server.tool()
    def calendar_read(day: str) -> dict:
        """Reads the calendar of one day (needs calendar:read)."""
        return {"day": day, "events": ["standup 09:30"], "caller": caller("calendar_read")}

    @server.tool()
    def crm_read(account: str) -> dict:
        """Reads a CRM account (needs crm:read)."""
        return {"account": account, "caller": caller("crm_read")}

    app = server.streamable_http_app(host=a.host)
    print(json.dumps({"url": url}), flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
