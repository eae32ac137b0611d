"""Fetch this process's SPIFFE identity from the agentd node agent with py-spiffe.

    python3 -m venv venv && venv/bin/pip install spiffe
    SPIFFE_ENDPOINT_SOCKET=unix:///run/agentd/api.sock venv/bin/python fetch.py [--audience A]

Prints the X.509-SVID's SPIFFE ID and expiry, the trust domains of the bundles, and a
JWT-SVID for the audience, validated by the node agent. `--json` prints the same as one JSON
object. The socket comes from SPIFFE_ENDPOINT_SOCKET, as for every SPIFFE client.
"""

import argparse
import json

from spiffe import WorkloadApiClient


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audience", default="example-tool", help="JWT-SVID audience")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    with WorkloadApiClient(default_timeout=30) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        jwt = client.fetch_jwt_svid(audience={args.audience})
        # The node agent checks the token's signature, expiry and audience.
        validated = client.validate_jwt_svid(jwt.token, args.audience)

    result = {
        "spiffe_id": str(svid.spiffe_id),
        "not_after": svid.leaf.not_valid_after_utc.isoformat(),
        "trust_domains": sorted(str(b.trust_domain) for b in bundles.bundles),
        "jwt_subject": str(validated.spiffe_id),
        "jwt_expiry": jwt.expiry,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"X.509-SVID: {result['spiffe_id']} (valid until {result['not_after']})")
    print(f"bundles for: {', '.join(result['trust_domains'])}")
    print(f"JWT-SVID for {args.audience!r}: subject {result['jwt_subject']}, validated")


if __name__ == "__main__":
    main()
