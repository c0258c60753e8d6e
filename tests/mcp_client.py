#!/usr/bin/env python3
"""A client of the broker's /mcp endpoint written with the official MCP
Python SDK (PyPI package `mcp`) and its Streamable HTTP transport, for the
integration tests (tests/tests/integration/mcp.rs).

It connects (mode `auto`: the SDK's default, `server/discover` at the newest
revision; or `legacy`: the `initialize` handshake), lists the tools and
calls one, then prints one JSON object on stdout:

    {"protocol": "...", "tools": [{"name", "description", "inputSchema"}],
     "call": {"isError": bool, "text": [...]} | {"error": {"code", "message"}}}

A failure to connect prints {"connectError": "..."} and exits 0, so the test
can assert on it.
"""

import argparse
import asyncio
import json
import ssl
import sys


async def run(args: argparse.Namespace) -> dict:
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    headers = {}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    verify: object = True
    if args.ca:
        verify = ssl.create_default_context(cafile=args.ca)
    http = httpx2.AsyncClient(
        headers=headers, verify=verify, timeout=httpx2.Timeout(30.0, read=60.0)
    )
    out: dict = {}
    async with http:
        transport = streamable_http_client(args.url, http_client=http, terminate_on_close=False)
        try:
            async with Client(transport, mode=args.mode, cache=None) as client:
                out["protocol"] = client.protocol_version
                listed = await client.list_tools()
                out["tools"] = [
                    {"name": t.name, "description": t.description, "inputSchema": t.input_schema}
                    for t in listed.tools
                ]
                if args.call:
                    params = json.loads(args.arguments)
                    try:
                        r = await client.call_tool(args.call, params)
                        texts = [c.text for c in r.content if getattr(c, "type", "") == "text"]
                        out["call"] = {"isError": bool(r.is_error), "text": texts}
                    except MCPError as e:
                        out["call"] = {"error": {"code": e.code, "message": str(e)}}
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["connectError"] = f"{type(e).__name__}: {e}"
            sub = getattr(e, "exceptions", None)
            if sub:
                out["connectError"] += " | " + " | ".join(f"{type(x).__name__}: {x}" for x in sub)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--ca", help="CA file to trust (HTTPS)")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--mode", default="auto", choices=["auto", "legacy"])
    p.add_argument("--call", help="tool to call after listing")
    p.add_argument("--arguments", default="{}", help="JSON arguments of the call")
    args = p.parse_args()
    out = asyncio.run(run(args))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
