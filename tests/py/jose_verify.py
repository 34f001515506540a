#!/usr/bin/env python3
"""Verify twin telemetry batches with an independent JOSE library (PyJWT).

Usage: jose_verify.py PUBLIC_KEY_PEM JWS_FILE

JWS_FILE holds one compact JWS per line, in chain order. For each line the
signature is verified with PyJWT (EdDSA only), the header is checked, and the
hash chain is checked independently of the gateway's code: prev_hash must be
the base64url SHA-256 of the previous line. Prints one JSON object per batch
and exits non-zero on the first failure.
"""
import base64
import hashlib
import json
import sys

import jwt
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def main() -> int:
    key = load_pem_public_key(open(sys.argv[1], "rb").read())
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    # RFC 7638 thumbprint, computed here from the key alone.
    kid = b64url(hashlib.sha256(json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}, separators=(",", ":")).encode()).digest())
    lines = [l.strip() for l in open(sys.argv[2], encoding="ascii") if l.strip()]
    prev_text = None
    prev_seq = None
    for token in lines:
        decoded = jwt.api_jws.decode_complete(token, key, algorithms=["EdDSA"])
        header = decoded["header"]
        if header.get("alg") != "EdDSA" or header.get("typ") != "twin-batch+jws" or set(header) != {"alg", "kid", "typ"} or header["kid"] != kid:
            print(f"unexpected header {header}", file=sys.stderr)
            return 1
        payload = json.loads(decoded["payload"])
        if prev_text is not None:
            want = b64url(hashlib.sha256(prev_text.encode("ascii")).digest())
            if payload["prev_hash"] != want or payload["seq"] != prev_seq + 1:
                print(f"chain broken at seq {payload['seq']}", file=sys.stderr)
                return 1
        elif payload["seq"] == 1 and payload["prev_hash"] != b64url(bytes(32)):
            print("genesis batch must have a zero prev_hash", file=sys.stderr)
            return 1
        print(json.dumps({"seq": payload["seq"], "gateway_id": payload["gateway_id"], "kid": header["kid"], "samples": len(payload["samples"])}))
        prev_text, prev_seq = token, payload["seq"]
    print(f"OK {len(lines)} batch(es) verified with PyJWT {jwt.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
