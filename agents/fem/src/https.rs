//! One HTTPS request to a broker (revocations, operator views), trusting
//! its certificate as the other commands do.

use std::time::Duration;

use anyhow::Context as _;
use fem_agent_sdk::cli::ConnectArgs;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends `METHOD path` with `headers` and `body` (HTTP/1.1, one request);
/// returns the status and the body.
///
/// # Errors
/// Connection, TLS or timeout failures (10 s).
pub(crate) async fn request(
    conn: &ConnectArgs,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let opts = conn.options()?;
    let tls = fem_agent_sdk::tls::client_config(&opts.trust, &[b"http/1.1"])?;
    let name = rustls::pki_types::ServerName::try_from(opts.host.clone())
        .with_context(|| format!("broker host {:?}", opts.host))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        opts.endpoint(),
        body.len()
    );
    for (k, v) in headers {
        anyhow::ensure!(!v.contains(['\r', '\n']), "header {k} holds a line break");
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((opts.host.as_str(), opts.port)).await?;
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(name, tcp)
            .await?;
        tls.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within 10 s", opts.endpoint()))?
        .with_context(|| format!("{method} https://{}{path}", opts.endpoint()))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    Ok((status, body.to_owned()))
}
