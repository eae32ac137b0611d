#!/bin/sh
# Makes the RSA test key used by the claims node attestor tests (ring cannot generate RSA
# keys). A throwaway key for tests only: it signs test JWTs and nothing else.
set -eu
out="$(dirname "$0")/../attestor/testdata/claims-test-rsa.pem"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$out"
echo "wrote $out"
