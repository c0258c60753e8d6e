#!/usr/bin/env python3
"""A client of `fem mcp` (the stdio MCP server that forwards to a broker)
written with the official MCP Python SDK (PyPI package `mcp`) and its stdio
transport, for the integration tests (tests/tests/integration/mcp_stdio.rs).

It launches COMMAND ARG... (everything after `--`) as a stdio MCP server,
connects (mode `auto`: `server/discover` at the newest revision; `legacy`:
the `initialize` handshake), lists the tools and calls one, then prints one
JSON object on stdout, as tests/mcp_client.py does:

    {"protocol": "...", "tools": [{"name", "description", "inputSchema"}],
     "call": {"isError": bool, "text": [...]} | {"error": {"code", "message"}}}

A failure to connect prints {"connectError": "..."} and exits 0.
"""

import argparse
import asyncio
import json
import sys


async def run(args: argparse.Namespace, command: list[str]) -> dict:
    from mcp.client.client import Client
    from mcp.client.stdio import StdioServerParameters
    from mcp.shared.exceptions import MCPError

    server = StdioServerParameters(command=command[0], args=command[1:])
    out: dict = {}
    try:
        async with Client(server, mode=args.mode, cache=None, read_timeout_seconds=60) as client:
            out["protocol"] = client.protocol_version
            listed = await client.list_tools()
            out["tools"] = [
                {"name": t.name, "description": t.description, "inputSchema": t.input_schema}
                for t in listed.tools
            ]
            if args.call:
                try:
                    r = await client.call_tool(args.call, json.loads(args.arguments))
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
    if "--" not in argv:
        print("usage: mcp_stdio_client.py [options] -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", default="auto", choices=["auto", "legacy"])
    p.add_argument("--call", help="tool to call after listing")
    p.add_argument("--arguments", default="{}", help="JSON arguments of the call")
    args = p.parse_args(argv[:i])
    command = argv[i + 1 :]
    if not command:
        print("no command after --", file=sys.stderr)
        return 2
    out = asyncio.run(run(args, command))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
