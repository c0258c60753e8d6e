//! Integration tests over real loopback sockets (QUIC, TLS/TCP) and real
//! processes. Each broker has its own 127.0.x.y address on port 8443.
#![allow(clippy::unwrap_used)]

mod attested;
mod bounds;
mod calls;
mod cancel;
mod faults;
mod federation;
mod hostile;
mod isolation;
mod mcp;
mod mcp_bridge;
mod mcp_conformance;
mod mcp_stdio;
mod ops;
mod processes;
mod routing;
mod trust;

use std::future::Future;
use std::time::Duration;

/// Runs a test body with a hard time bound.
pub(crate) async fn bounded<F: Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test exceeded its {secs} s bound"));
}
