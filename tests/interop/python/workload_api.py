"""Drives a node agent's Workload API with py-spiffe (on grpcio) and with raw grpcio.

Run by tests/tests/interop_clients.rs: `python workload_api.py MODE SOCKET [ARGS]`. Each mode
prints one JSON object on stdout with what the client saw; the Rust test asserts on it. Any
client error propagates (non-zero exit with the traceback on stderr).
"""

import json
import sys
import threading
import time


def x509(socket):
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(socket_path=socket, default_timeout=20) as client:
        ctx = client.fetch_x509_context()
        default = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        return {
            "context_ids": [str(s.spiffe_id) for s in ctx.x509_svids],
            "context_default": str(ctx.default_svid.spiffe_id),
            "context_bundle_tds": sorted(str(b.trust_domain) for b in ctx.x509_bundle_set.bundles),
            "default_id": str(default.spiffe_id),
            "default_chain_len": len(default.cert_chain),
            "default_serial": format(default.leaf.serial_number, "x"),
            "bundle_tds": sorted(str(b.trust_domain) for b in bundles.bundles),
            "bundle_authorities": sum(len(b.x509_authorities) for b in bundles.bundles),
        }


def jwt(socket, audience):
    from spiffe import JwtSvid, TrustDomain, WorkloadApiClient

    with WorkloadApiClient(socket_path=socket, default_timeout=20) as client:
        svid = client.fetch_jwt_svid(audience={audience})
        validated = client.validate_jwt_svid(svid.token, audience)
        bundles = client.fetch_jwt_bundles()
        td = TrustDomain(str(svid.spiffe_id).split("/")[2])
        # An independent check with py-spiffe's own validator against the fetched bundle.
        checked = JwtSvid.parse_and_validate(
            svid.token, bundles.get_bundle_for_trust_domain(td), {audience}
        )
        rejected = None
        try:
            client.validate_jwt_svid(svid.token, audience + "-other")
        except Exception as e:  # the node agent must refuse another audience
            rejected = type(e).__name__
        return {
            "jwt_id": str(svid.spiffe_id),
            "jwt_audience": sorted(svid.audience),
            "validated_id": str(validated.spiffe_id),
            "checked_id": str(checked.spiffe_id),
            "other_audience_error": rejected,
            "jwt_bundle_tds": sorted(str(b.trust_domain) for b in bundles.bundles),
            "jwt_bundle_keys": len(bundles.get_bundle_for_trust_domain(td).jwt_authorities),
        }


def rotation(socket, within):
    """An X509Source whose open stream delivers a rotated SVID."""
    from spiffe import X509Source

    changed = threading.Event()
    with X509Source(socket_path=socket, timeout_in_seconds=20) as source:
        first = format(source.svid.leaf.serial_number, "x")
        source.subscribe_for_updates(changed.set)
        deadline = time.monotonic() + float(within)
        second = first
        while second == first and time.monotonic() < deadline:
            changed.wait(timeout=max(0.0, deadline - time.monotonic()))
            changed.clear()
            second = format(source.svid.leaf.serial_number, "x")
        return {
            "id": str(source.svid.spiffe_id),
            "first_serial": first,
            "second_serial": second,
            "closed": source.is_closed(),
        }


def raw_grpcio(socket):
    """Plain grpcio, default channel options, raw protobuf bytes: the statuses the spec names."""
    import grpc

    # JWTSVIDRequest{audience: ["raw"]}: field 1, length-delimited.
    request = b"\x0a\x03raw"
    out = {}
    with grpc.insecure_channel(socket) as channel:
        call = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for name, metadata in (
            ("without_header", None),
            ("with_header", (("workload.spiffe.io", "true"),)),
        ):
            try:
                call(request, metadata=metadata, timeout=20)
                out[name] = {"code": "OK", "details": ""}
            except grpc.RpcError as e:
                out[name] = {"code": e.code().name, "details": e.details()}
    return out


def main():
    mode, socket, *rest = sys.argv[1:]
    modes = {"x509": x509, "jwt": jwt, "rotation": rotation, "raw-grpcio": raw_grpcio}
    print(json.dumps(modes[mode](socket, *rest)))


if __name__ == "__main__":
    main()
