#!/usr/bin/env python3
"""A FEM JSON-gateway client written from docs/gateway.md alone.

Usage: gateway_client.py https://HOST:PORT CA_FILE AGENT_ID TOOL PARAMS_JSON
Prints the verified result JSON; exits 2 with the error JSON on a refusal.
Needs the `cryptography` package for Ed25519.
"""
import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def signing_input(fmt, kind, data):
    return b"fem/1 " + fmt.encode() + b" " + kind.encode() + b"\n" + data


def main():
    url, ca, agent, tool, params = sys.argv[1:6]
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    now = int(time.time() * 1000)
    envelope = {
        "header": {"sender": "py-client", "timestampMs": now, "nonce": os.urandom(16).hex()},
        "body": {
            "toolCall": {
                "requestId": os.urandom(16).hex(),
                "target": {"agent": agent},
                "tool": tool,
                "parameters": json.loads(params),
                "deadlineMs": now + 10_000,
            }
        },
    }
    data = json.dumps(envelope).encode()
    request = {
        "publicKey": pub.hex(),
        "envelope": {
            "format": "json",
            "bytes": base64.b64encode(data).decode(),
            "signature": key.sign(signing_input("json", "toolCall", data)).hex(),
        },
    }
    ctx = ssl.create_default_context(cafile=ca)
    req = urllib.request.Request(
        url + "/v1/call",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as e:
        print(e.read().decode(), file=sys.stderr)
        sys.exit(2)
    result = answer["result"]
    assert result["format"] == "json", result
    rbytes = base64.b64decode(result["bytes"])
    signer = Ed25519PublicKey.from_public_bytes(bytes.fromhex(answer["signer"]))
    # Raises InvalidSignature if the agent's signature does not verify.
    signer.verify(bytes.fromhex(result["signature"]), signing_input("json", "toolResult", rbytes))
    env = json.loads(rbytes)
    assert env["header"]["sender"] == agent, env
    outcome = env["body"]["toolResult"]["outcome"]
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
