//! `fem mcp`: a stdio MCP server that forwards to a broker's `/mcp`, so
//! desktop clients that only launch stdio servers reach the mesh.
//!
//! A thin forwarder, not an rmcp proxy: each newline-delimited JSON-RPC
//! message read from stdin is POSTed unchanged to `/mcp` (or
//! `/mcp/<view>`), and each message of the answer (an `application/json`
//! body, or the `data:` of each `text/event-stream` event) is written to
//! stdout on one line. The bytes pass through, so fields this build does
//! not know (a newer revision, `_meta`, extensions) reach the broker and
//! the client as they were, and both protocol eras work as the broker
//! serves them. What a Streamable HTTP client adds, the forwarder adds: the
//! `MCP-Protocol-Version` header (the request's `_meta` version, else the
//! version the `initialize` handshake settled), `Mcp-Method` and
//! `Mcp-Name`, and the bearer token. (`Mcp-Param-*` headers, for tools whose
//! schema asks for them, are not sent: the broker's tools do not.)
//!
//! Messages are forwarded concurrently (a slow call does not hold up a
//! listing). Notifications and answers to server requests get no output.
//! A broker that cannot be reached, or answers with an HTTP error, is a
//! JSON-RPC error answer to the request, never a crash. Only protocol
//! messages go to stdout; logs go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use fem_agent_sdk::cli::TrustArgs;
use fem_net::BrokerUrl;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Longest message read from stdin or from the broker (bytes).
const MAX_MESSAGE: usize = 16 << 20;

/// `_meta` key of the protocol revision in 2026-07-28 requests.
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// JSON-RPC error code for a request the broker did not answer (a server
/// error in the implementation-defined range).
const BROKER_ERROR: i64 = -32000;

/// Options of `fem mcp`.
#[derive(Debug, clap::Args)]
pub(crate) struct McpArgs {
    /// Broker URL: https://host:8443, or http://127.0.0.1:PORT for a
    /// broker's loopback `--mcp-listen` listener.
    #[arg(long, env = "FEM_BROKER_URL", default_value = "https://localhost:8443")]
    broker: String,
    #[command(flatten)]
    trust: TrustArgs,
    /// Serve the broker's view `/mcp/VIEW` instead of `/mcp`.
    #[arg(long, env = "FEM_MCP_VIEW")]
    view: Option<String>,
    /// Bearer token of the broker's MCP principal.
    #[arg(
        long,
        env = "FEM_MCP_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the bearer token (trimmed).
    #[arg(long, env = "FEM_MCP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Sign every request with this private key instead of a token: the
    /// broker then attests calls as `--id` (only tools that accept
    /// broker-attested calls can be called).
    #[arg(
        long,
        env = "FEM_KEY_FILE",
        requires = "id",
        conflicts_with_all = ["token", "token_file"]
    )]
    key: Option<PathBuf>,
    /// The id to call as, with `--key` (the grant must allow registering it).
    #[arg(long, env = "FEM_CLIENT_ID", requires = "key")]
    id: Option<String>,
    /// Grant file (from `fem trust grant`) for `--key`, required by brokers
    /// with a trust anchor.
    #[arg(long, env = "FEM_GRANT", requires = "key")]
    grant: Option<PathBuf>,
    /// Longest wait for the broker's answer to one message.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Why `fem mcp` cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum SetupError {
    /// The broker URL, trust options or CA file.
    #[error(transparent)]
    Net(#[from] fem_net::NetError),
    /// A URL this command cannot use.
    #[error("--broker {url}: {why}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A view name outside `[A-Za-z0-9_-]`.
    #[error("--view {0:?}: a view name is [A-Za-z0-9_-]")]
    View(String),
    /// The token file.
    #[error("--token-file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// A token that cannot be an HTTP header value.
    #[error("the bearer token must be printable ASCII")]
    Token,
    /// The signing key, grant or id.
    #[error("--key/--grant/--id: {0:#}")]
    Signer(anyhow::Error),
    /// The HTTP client.
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The HTTPS client (TLS configuration).
    #[error("HTTPS client: {0:#}")]
    Https(anyhow::Error),
}

/// Why one message got no answer from the broker.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("broker unreachable or failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("broker answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("broker answer larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("broker answered with content type {0:?}")]
    ContentType(String),
    #[error("broker answer is not JSON: {0}")]
    NotJson(serde_json::Error),
}

/// Runs the forwarder until stdin closes and every answer is written.
///
/// # Errors
/// [`SetupError`] for bad options; the broker being down is not an error.
pub(crate) async fn run(args: McpArgs) -> Result<ExitCode, SetupError> {
    let fwd = Arc::new(Forwarder::new(&args)?);
    tracing::info!(url = %fwd.url, "fem mcp: forwarding stdin to the broker");
    let (out_tx, mut out_rx) = mpsc::channel::<String>(64);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = out_rx.recv().await {
            let ok = stdout.write_all(line.as_bytes()).await.is_ok()
                && stdout.write_all(b"\n").await.is_ok()
                && stdout.flush().await.is_ok();
            if !ok {
                tracing::warn!("stdout closed");
                break;
            }
        }
    });
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let line = match read_line(&mut stdin).await {
            Ok(Some(Line::Message(l))) => l,
            Ok(Some(Line::TooLong)) => {
                let e = error_answer(&Value::Null, -32600, "message too long", None);
                let _ = out_tx.send(e).await;
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("stdin: {e}");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let fwd = Arc::clone(&fwd);
        let out = out_tx.clone();
        tasks.spawn(async move {
            for answer in fwd.forward(line).await {
                if out.send(answer).await.is_err() {
                    break;
                }
            }
        });
        // Reap finished tasks as we go.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    drop(out_tx);
    let _ = writer.await;
    Ok(ExitCode::SUCCESS)
}

enum Line {
    Message(Vec<u8>),
    TooLong,
}

/// One line of stdin without its newline; `None` at the end of input.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let limit = u64::try_from(MAX_MESSAGE).unwrap_or(u64::MAX) + 1;
    let n = (&mut *r).take(limit).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(Line::Message(buf)));
    }
    if buf.len() <= MAX_MESSAGE {
        return Ok(Some(Line::Message(buf))); // last line, no newline
    }
    // Skip the rest of the long line.
    loop {
        buf.clear();
        let n = (&mut *r).take(limit).read_until(b'\n', &mut buf).await?;
        if n == 0 || buf.last() == Some(&b'\n') {
            return Ok(Some(Line::TooLong));
        }
    }
}

/// Posts messages to one broker endpoint.
#[derive(Debug)]
struct Forwarder {
    http: reqwest::Client,
    url: reqwest::Url,
    token: Option<HeaderValue>,
    /// With `--key`: the key every request is signed with, and the grant
    /// (file form) sent beside it.
    signer: Option<(fem_proto::SigningKey, Option<String>)>,
    timeout: Duration,
    /// The version the `initialize` handshake settled.
    negotiated: Mutex<Option<String>>,
}

impl Forwarder {
    fn new(a: &McpArgs) -> Result<Self, SetupError> {
        let mut url = endpoint(&a.broker, a.view.as_deref())?;
        let signer = match (&a.key, &a.id) {
            (Some(k), Some(id)) => {
                let id = fem_proto::AgentId::new(id.as_str())
                    .map_err(|e| SetupError::Signer(e.into()))?;
                // The caller's id is part of the signed path.
                url.query_pairs_mut().append_pair("as", id.as_str());
                let key = fem_net::keys::load_key(k).map_err(|e| SetupError::Signer(e.into()))?;
                let grant = a
                    .grant
                    .as_deref()
                    .map(|g| crate::trust::read_grant(g).and_then(|g| Ok(g.to_text()?)))
                    .transpose()
                    .map_err(SetupError::Signer)?;
                Some((key, grant))
            }
            _ => None,
        };
        let http = crate::https::client(&a.trust.trust()?).map_err(SetupError::Https)?;
        let token = match (&a.token, &a.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| SetupError::TokenFile {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let token = token
            .map(|t| {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| SetupError::Token)?;
                v.set_sensitive(true);
                Ok::<_, SetupError>(v)
            })
            .transpose()?;
        Ok(Self {
            http,
            url,
            token,
            signer,
            timeout: a.timeout,
            negotiated: Mutex::new(None),
        })
    }

    /// Forwards one message; returns the lines to write to stdout.
    async fn forward(&self, body: Vec<u8>) -> Vec<String> {
        let msg: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return vec![error_answer(
                    &Value::Null,
                    -32700,
                    &format!("parse error: {e}"),
                    None,
                )];
            }
        };
        // The id of a request (a message with a method and an id); a batch
        // or a notification has none, and gets no error answer.
        let id = match (&msg.get("method"), msg.get("id")) {
            (Some(_), Some(id)) => Some(id.clone()),
            _ => None,
        };
        let is_initialize = msg.get("method").and_then(Value::as_str) == Some("initialize");
        match self.post(&msg, body).await {
            Ok(answers) => {
                if is_initialize {
                    self.remember_version(&answers, id.as_ref());
                }
                answers.into_iter().map(|a| one_line(&a)).collect()
            }
            Err(e) => {
                tracing::warn!("{e}");
                match id {
                    Some(id) => vec![error_answer(&id, BROKER_ERROR, &e.to_string(), None)],
                    None => Vec::new(),
                }
            }
        }
    }

    /// Keeps the `protocolVersion` of the answer to `initialize`.
    fn remember_version(&self, answers: &[Value], id: Option<&Value>) {
        let v = answers
            .iter()
            .find(|a| a.get("id") == id)
            .and_then(|a| a.pointer("/result/protocolVersion"))
            .and_then(Value::as_str);
        if let Some(v) = v
            && let Ok(mut n) = self.negotiated.lock()
        {
            *n = Some(v.to_owned());
        }
    }

    /// The headers a Streamable HTTP client sends with `msg`.
    fn headers(&self, msg: &Value) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Some(t) = &self.token {
            h.insert(AUTHORIZATION, t.clone());
        }
        let version = msg
            .pointer("/params/_meta")
            .and_then(|m| m.get(META_VERSION))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                let initialize = msg.get("method").and_then(Value::as_str) == Some("initialize");
                let n = self.negotiated.lock().ok().and_then(|n| n.clone());
                n.filter(|_| !initialize)
            });
        if let Some(v) = version.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert("mcp-protocol-version", v);
        }
        if let Some(method) = msg.get("method").and_then(Value::as_str) {
            if let Ok(v) = HeaderValue::from_str(method) {
                h.insert("mcp-method", v);
            }
            if let Some(name) = mcp_name(method, msg.get("params"))
                && let Ok(v) = HeaderValue::from_str(&header_value(name))
            {
                h.insert("mcp-name", v);
            }
        }
        h
    }

    /// POSTs `body`; returns the messages of the answer.
    async fn post(&self, msg: &Value, body: Vec<u8>) -> Result<Vec<Value>, ForwardError> {
        let mut headers = self.headers(msg);
        if let Some((key, grant)) = &self.signer {
            let path = match self.url.query() {
                Some(q) => format!("{}?{q}", self.url.path()),
                None => self.url.path().to_owned(),
            };
            let sig = fem_proto::http_sig::HttpSignature::sign(key, "POST", &path, &body);
            if let Ok(v) = HeaderValue::from_str(&sig.to_header()) {
                headers.insert(fem_proto::http_sig::SIGNATURE_HEADER, v);
            }
            if let Some(v) = grant.as_deref().and_then(|g| HeaderValue::from_str(g).ok()) {
                headers.insert(fem_proto::http_sig::GRANT_HEADER, v);
            }
        }
        let mut resp = self
            .http
            .post(self.url.clone())
            .headers(headers)
            .timeout(self.timeout)
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if status == reqwest::StatusCode::ACCEPTED || status == reqwest::StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        if ctype.starts_with("text/event-stream") && status.is_success() {
            return sse(&mut resp).await;
        }
        let bytes = read_body(&mut resp).await?;
        // rmcp answers some refusals (a header mismatch, a bad request) with
        // an HTTP error whose body is a JSON-RPC error: pass it on.
        if ctype.starts_with("application/json")
            && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
            && (status.is_success() || is_jsonrpc_answer(&v))
        {
            return Ok(match v {
                Value::Array(items) => items,
                v => vec![v],
            });
        }
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Vec::new());
            }
            return Err(ForwardError::ContentType(ctype));
        }
        let text = String::from_utf8_lossy(&bytes);
        Err(ForwardError::Status {
            status: status.as_u16(),
            body: text.chars().take(500).collect(),
        })
    }
}

fn is_jsonrpc_answer(v: &Value) -> bool {
    v.get("jsonrpc").is_some() && (v.get("error").is_some() || v.get("result").is_some())
}

/// The whole body, at most [`MAX_MESSAGE`] bytes.
async fn read_body(resp: &mut reqwest::Response) -> Result<Vec<u8>, ForwardError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > MAX_MESSAGE {
            return Err(ForwardError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The JSON messages of an SSE stream (events with an empty `data` skipped).
async fn sse(resp: &mut reqwest::Response) -> Result<Vec<Value>, ForwardError> {
    let mut parser = SseParser::default();
    let mut out = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = resp.chunk().await? {
        total += chunk.len();
        if total > MAX_MESSAGE {
            return Err(ForwardError::TooLarge);
        }
        for data in parser.push(&chunk) {
            out.push(serde_json::from_str(&data).map_err(ForwardError::NotJson)?);
        }
    }
    if let Some(data) = parser.finish() {
        out.push(serde_json::from_str(&data).map_err(ForwardError::NotJson)?);
    }
    Ok(out)
}

/// Splits a `text/event-stream` body into the `data` of its events.
#[derive(Debug, Default)]
struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; returns the data of every event they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if let Some(d) = self.data.take()
                    && !d.is_empty()
                {
                    events.push(d);
                }
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            if field == "data" {
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
        }
        events
    }

    /// The data of an event the stream ended without a blank line after.
    fn finish(&mut self) -> Option<String> {
        if !self.pending.is_empty() {
            // The last line had no newline.
            let _ = self.push(b"\n");
        }
        self.data.take().filter(|d| !d.is_empty())
    }
}

/// The broker's MCP endpoint for `broker` and `view`.
fn endpoint(broker: &str, view: Option<&str>) -> Result<reqwest::Url, SetupError> {
    let bad = |why| SetupError::Url {
        url: broker.to_owned(),
        why,
    };
    if let Some(v) = view
        && (v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    {
        return Err(SetupError::View(v.to_owned()));
    }
    let path = match view {
        Some(v) => format!("/mcp/{v}"),
        None => "/mcp".to_owned(),
    };
    let base = if broker.starts_with("http://") {
        let u = reqwest::Url::parse(broker).map_err(|_| bad("not a URL"))?;
        let loopback = match u.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        if !loopback {
            return Err(bad(
                "plain http:// is for a loopback --mcp-listen listener only; use https://",
            ));
        }
        if !matches!(u.path(), "" | "/") || u.query().is_some() {
            return Err(bad(
                "give the broker's address without a path (--view VIEW)",
            ));
        }
        u.origin().ascii_serialization()
    } else {
        let b = BrokerUrl::parse(broker)?;
        let rest = broker.split_once("://").map_or("", |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if !matches!(&rest[authority.len()..], "" | "/") {
            return Err(bad(
                "give the broker's address without a path (--view VIEW)",
            ));
        }
        format!("https://{}", fem_net::endpoint(b.host(), b.port()))
    };
    reqwest::Url::parse(&format!("{base}{path}")).map_err(|_| bad("not a URL"))
}

/// The `Mcp-Name` of a request: its tool or prompt name, resource URI or task id.
fn mcp_name<'a>(method: &str, params: Option<&'a Value>) -> Option<&'a str> {
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
        "tasks/get" | "tasks/update" | "tasks/cancel" => "taskId",
        _ => return None,
    };
    params?.get(key)?.as_str()
}

/// A header value as MCP clients encode it: as is, or `=?base64?...?=` when
/// it has outer blanks, control or non-ASCII characters, or looks encoded.
fn header_value(v: &str) -> String {
    let b = v.as_bytes();
    let needs = matches!(b.first(), Some(b' ' | b'\t'))
        || matches!(b.last(), Some(b' ' | b'\t'))
        || v.chars().any(|c| !(' '..='~').contains(&c))
        || (v.starts_with("=?base64?") && v.ends_with("?="));
    if needs {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    } else {
        v.to_owned()
    }
}

/// A JSON-RPC error answer on one line.
fn error_answer(id: &Value, code: i64, message: &str, data: Option<Value>) -> String {
    let mut err = json!({"code": code, "message": message});
    if let Some(d) = data {
        err["data"] = d;
    }
    one_line(&json!({"jsonrpc": "2.0", "id": id, "error": err}))
}

/// A message as one line of JSON (compact JSON has no raw newline).
fn one_line(v: &Value) -> String {
    v.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn endpoints() {
        let e = |b, v| endpoint(b, v).map(|u| u.to_string());
        assert_eq!(
            e("https://h.example", None).unwrap(),
            "https://h.example:8443/mcp"
        );
        assert_eq!(
            e("https://127.0.0.1:9443/", Some("ops")).unwrap(),
            "https://127.0.0.1:9443/mcp/ops"
        );
        assert_eq!(
            e("http://127.0.0.1:8080", None).unwrap(),
            "http://127.0.0.1:8080/mcp"
        );
        assert!(e("http://broker.example:8080", None).is_err());
        assert!(e("https://h/mcp", None).is_err());
        assert!(e("https://h", Some("../admin")).is_err());
        assert!(e("https://h", Some("a/b")).is_err());
        assert!(e("ftp://h", None).is_err());
    }

    #[test]
    fn sse_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(
            p.push(b"id: 1\ndata:\n\nevent: message\ndata: {\"a\"")
                .is_empty()
        );
        assert_eq!(
            p.push(b":1}\r\n\r\ndata: [1,\ndata: 2]\n\n"),
            ["{\"a\":1}", "[1,\n2]"]
        );
        assert!(p.push(b"data: 3").is_empty());
        assert_eq!(p.finish().as_deref(), Some("3"));
    }

    #[test]
    fn header_values_encoded_when_needed() {
        assert_eq!(header_value("shell_run"), "shell_run");
        assert_eq!(header_value("héllo"), "=?base64?aMOpbGxv?=");
        assert_eq!(header_value(" x"), "=?base64?IHg=?=");
    }

    #[tokio::test]
    async fn long_lines_are_refused_and_skipped() {
        let mut input = vec![b'x'; MAX_MESSAGE + 10];
        input.extend_from_slice(b"\n{}\n");
        let mut r = BufReader::new(&input[..]);
        assert!(matches!(
            read_line(&mut r).await.unwrap(),
            Some(Line::TooLong)
        ));
        assert!(matches!(read_line(&mut r).await.unwrap(), Some(Line::Message(m)) if m == b"{}"));
        assert!(read_line(&mut r).await.unwrap().is_none());
    }
}
