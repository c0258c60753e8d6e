//! The MCP row of the `single` workload: the same echo calls as MCP
//! `tools/call` requests through the broker's `/mcp` over HTTPS (HTTP/1.1
//! keep-alive, one connection per concurrent caller), to the same agent by
//! its per-agent MCP name, with the same parameters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// The revision the requests name: stateless, no handshake needed.
const VERSION: &str = "2025-11-25";

/// Calls one MCP tool through a broker's `/mcp` (cheap to clone).
#[derive(Clone)]
pub(crate) struct McpClient(Arc<Inner>);

struct Inner {
    addr: SocketAddr,
    tls: TlsConnector,
    tool: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for McpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpClient")
            .field("addr", &self.0.addr)
            .field("tool", &self.0.tool)
            .finish_non_exhaustive()
    }
}

impl McpClient {
    /// A client of `https://addr/mcp` trusting the PEM file `ca`, calling
    /// the MCP tool `tool`.
    pub(crate) fn new(addr: SocketAddr, ca: &std::path::Path, tool: &str) -> anyhow::Result<Self> {
        let trust = fem_agent_sdk::Trust::CaFile(ca.to_owned());
        let cfg = fem_net::tls::client_config(&trust, &[b"http/1.1"])?;
        Ok(Self(Arc::new(Inner {
            addr,
            tls: TlsConnector::from(Arc::new(cfg)),
            tool: tool.to_owned(),
            idle: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = tokio::net::TcpStream::connect(self.0.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(self.0.addr.ip().into());
        let tls = self
            .0
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// One `tools/call` with `arguments`; returns the tool's JSON result.
    pub(crate) async fn call(
        &self,
        arguments: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let idle = self.0.idle.lock().ok().and_then(|mut v| v.pop());
        let mut send = match idle {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        send.ready().await.map_err(|e| format!("HTTP: {e}"))?;
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::json!({
            "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": self.0.tool, "arguments": arguments},
        });
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let req = hyper::Request::post("/mcp")
            .header(hyper::header::HOST, self.0.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json, text/event-stream")
            .header("mcp-protocol-version", VERSION)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("HTTP body: {e}"))?
            .to_bytes();
        if let Ok(mut v) = self.0.idle.lock() {
            v.push(send);
        }
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("answer: {e}"))?;
        let result = &v["result"];
        let text = result["content"][0]["text"].as_str();
        match (result["isError"].as_bool(), text) {
            (Some(false), Some(t)) => serde_json::from_str(t).map_err(|e| format!("result: {e}")),
            _ => Err(format!("MCP answer: {v}")),
        }
    }
}
