"""A relying party and a raw OAuth client for the OAuth front door tests
(tests/tests/oauth.rs), on the standard library and PyJWT. One JSON line on stdout.

    oauth_client.py get URL --ca-file F
    oauth_client.py post URL --ca-file F [--content-type CT] (--form K=V ... | --body-file P)
    oauth_client.py validate-svid --issuer I --audience A --token T --ca-file F
"""

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

import jwt


def answer(req, ctx):
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body.decode(errors="replace")
    return {"status": status, "body": parsed}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--ca-file", required=True)
    po = sub.add_parser("post")
    po.add_argument("url")
    po.add_argument("--ca-file", required=True)
    po.add_argument("--content-type", default="application/x-www-form-urlencoded")
    po.add_argument("--form", action="append", default=[], help="K=V, urlencoded")
    po.add_argument("--body-file")
    v = sub.add_parser("validate-svid")
    v.add_argument("--issuer", required=True)
    v.add_argument("--audience", required=True)
    v.add_argument("--token", required=True)
    v.add_argument("--ca-file", required=True)
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.ca_file)
    if a.cmd == "get":
        out = answer(urllib.request.Request(a.url), ctx)
    elif a.cmd == "post":
        if a.body_file:
            body = open(a.body_file, "rb").read()
        else:
            body = urllib.parse.urlencode([tuple(kv.split("=", 1)) for kv in a.form]).encode()
        req = urllib.request.Request(a.url, data=body, headers={"Content-Type": a.content_type})
        out = answer(req, ctx)
    else:
        # OpenID Connect discovery, then the JWKS, then PyJWT's own validation.
        conf = answer(urllib.request.Request(f"{a.issuer}/.well-known/openid-configuration"), ctx)["body"]
        if conf["issuer"] != a.issuer:
            raise SystemExit(f"discovery issuer {conf['issuer']!r} is not {a.issuer!r}")
        key = jwt.PyJWKClient(conf["jwks_uri"], ssl_context=ctx).get_signing_key_from_jwt(a.token)
        try:
            out = {"valid": True, "claims": jwt.decode(a.token, key.key, algorithms=conf["id_token_signing_alg_values_supported"], audience=a.audience, issuer=a.issuer)}
        except jwt.PyJWTError as e:
            out = {"valid": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
