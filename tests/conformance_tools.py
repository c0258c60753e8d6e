#!/usr/bin/env python3
"""The tools the MCP conformance suite's server scenarios call
(`@modelcontextprotocol/conformance`, `server` mode), as a stdio MCP server
written with the official Python SDK (PyPI package `mcp`), each as the
suite's description of the scenario asks. The conformance test
(tests/tests/integration/mcp_conformance.rs) bridges it into the mesh with
fem-mcp-bridge, beside the reference server `server-everything`, and runs
the suite against another broker's /mcp.
"""

import base64

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import (
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)

# A 1x1 red PNG.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)
# A tiny WAV header with no samples.
WAV = base64.b64encode(
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00D\xac\x00\x00\x88X\x01\x00\x02\x00\x10\x00data\x00\x00\x00\x00"
).decode()

app = MCPServer("fem-conformance-tools")


@app.tool(description="Returns simple text")
def test_simple_text() -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text="This is a simple text response for testing.")])


@app.tool(description="Returns an image")
def test_image_content() -> CallToolResult:
    return CallToolResult(content=[ImageContent(type="image", data=PNG, mime_type="image/png")])


@app.tool(description="Returns audio")
def test_audio_content() -> CallToolResult:
    return CallToolResult(content=[AudioContent(type="audio", data=WAV, mime_type="audio/wav")])


@app.tool(description="Returns an embedded resource")
def test_embedded_resource() -> CallToolResult:
    res = TextResourceContents(uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content.")
    return CallToolResult(content=[EmbeddedResource(type="resource", resource=res)])


@app.tool(description="Returns text, an image and a resource")
def test_multiple_content_types() -> CallToolResult:
    res = TextResourceContents(uri="test://mixed-content-resource", mime_type="application/json", text='{"test": "data", "value": 123}')
    return CallToolResult(
        content=[
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=PNG, mime_type="image/png"),
            EmbeddedResource(type="resource", resource=res),
        ]
    )


@app.tool(description="Always fails")
def test_error_handling() -> CallToolResult:
    return CallToolResult(is_error=True, content=[TextContent(type="text", text="This tool intentionally returns an error for testing")])


@app.tool(description="Logs three messages")
async def test_tool_with_logging(ctx: Context) -> str:
    for m in ["Tool execution started", "Tool processing data", "Tool execution completed"]:
        await ctx.info(m)
    return "Logging test completed"


@app.tool(description="Reports progress")
async def test_tool_with_progress(ctx: Context) -> str:
    for p in (0, 50, 100):
        await ctx.report_progress(p, 100)
    return "Progress test completed"


@app.tool(name="json_schema_2020_12_tool", description="Tool with JSON Schema 2020-12 features")
def json_schema_2020_12_tool(name: str = "", address: dict | None = None) -> str:
    return "ok"


# The suite checks that `$schema`, `$defs` and `additionalProperties` are
# listed as given; the SDK derives schemas from signatures, so set it here.
app._tool_manager.get_tool("json_schema_2020_12_tool").parameters = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}

app.run()
