#!/usr/bin/env python3
"""An MCP client written with the official MCP Python SDK (PyPI package
`mcp`), for the integration tests: over Streamable HTTP to a broker's /mcp
(`--url`, tests/tests/integration/mcp.rs), or over stdio to a server it
launches (`-- COMMAND ARG...`, e.g. `fem mcp`, tests/tests/integration/
mcp_stdio.rs).

It connects (mode `auto`: the SDK's default, `server/discover` at the newest
revision; or `legacy`: the `initialize` handshake), lists the tools and
calls one, then prints one JSON object on stdout:

    {"protocol": "...", "tools": [{"name", "description", "inputSchema"}],
     "call": {"isError": bool, "text": [...]} | {"error": {"code", "message"}},
     "progress": [{"progress", "total", "message"}]}   (with --progress)

A failure to connect prints {"connectError": "..."} and exits 0, so the test
can assert on it.
"""

import argparse
import asyncio
import contextlib
import json
import ssl
import sys


async def run(args: argparse.Namespace, command: list[str]) -> dict:
    from mcp.client.client import Client
    from mcp.shared.exceptions import MCPError

    out: dict = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            if command:
                from mcp.client.stdio import StdioServerParameters

                target = StdioServerParameters(command=command[0], args=command[1:])
                extra = {"read_timeout_seconds": 60}
            else:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client

                headers = {}
                if args.token:
                    headers["Authorization"] = f"Bearer {args.token}"
                verify: object = True
                if args.ca:
                    verify = ssl.create_default_context(cafile=args.ca)
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(
                        headers=headers, verify=verify, timeout=httpx2.Timeout(30.0, read=60.0)
                    )
                )
                target = streamable_http_client(args.url, http_client=http, terminate_on_close=False)
                extra = {}
            client = await stack.enter_async_context(
                Client(target, mode=args.mode, cache=None, **extra)
            )
            out["protocol"] = client.protocol_version
            listed = await client.list_tools()
            out["tools"] = [
                {"name": t.name, "description": t.description, "inputSchema": t.input_schema}
                for t in listed.tools
            ]
            if args.call:
                updates: list = []

                async def on_progress(progress, total, message):
                    updates.append({"progress": progress, "total": total, "message": message})

                try:
                    r = await client.call_tool(
                        args.call,
                        json.loads(args.arguments),
                        progress_callback=on_progress if args.progress else None,
                    )
                    if args.progress:
                        out["progress"] = updates
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
    argv = sys.argv[1:]
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
        if not command:
            print("no command after --", file=sys.stderr)
            return 2
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", help="the /mcp endpoint (without a command after --)")
    p.add_argument("--ca", help="CA file to trust (HTTPS)")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--mode", default="auto", choices=["auto", "legacy"])
    p.add_argument("--call", help="tool to call after listing")
    p.add_argument("--arguments", default="{}", help="JSON arguments of the call")
    p.add_argument(
        "--progress", action="store_true", help="ask for progress; print the updates as \"progress\""
    )
    args = p.parse_args(argv)
    if not command and not args.url:
        p.error("give --url, or a server command after --")
    out = asyncio.run(run(args, command))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
