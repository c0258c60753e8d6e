//! HTTPS requests to a broker (revocations, operator views, the MCP
//! forwarder): one reqwest client built on fem-net's TLS configuration, so
//! every command trusts the broker the same way.

use std::time::Duration;

use anyhow::Context as _;
use fem_agent_sdk::cli::ConnectArgs;
use fem_agent_sdk::tls;

/// A client trusting what `trust` says (CA file, pin, or `--insecure`).
///
/// # Errors
/// The TLS configuration or the client cannot be built.
pub(crate) fn client(trust: &fem_agent_sdk::Trust) -> anyhow::Result<reqwest::Client> {
    let tls = tls::client_config(trust, &[b"h2", b"http/1.1"])?;
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .build()?)
}

/// Sends `METHOD path` with `headers` and `body` to the broker of `conn`;
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
    let url = format!("https://{}{path}", opts.endpoint());
    let method = reqwest::Method::from_bytes(method.as_bytes()).context("HTTP method")?;
    let mut req = client(&opts.trust)?
        .request(method.clone(), &url)
        .timeout(Duration::from_secs(10))
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .text()
        .await
        .with_context(|| format!("{method} {url}"))?;
    Ok((status, text.trim().to_owned()))
}
