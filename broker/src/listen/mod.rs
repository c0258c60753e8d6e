//! Listeners: QUIC on UDP and TLS on TCP, the same port number; ALPN picks
//! the native protocol or HTTP on TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fem_net::wire::write_loop;
use fem_proto::{ALPN_NATIVE, ErrorCode, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::state::Shared;

mod counted;
pub(crate) mod gateway;
pub(crate) mod http;
mod session;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn tcp_accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let http = http::tls_router(Arc::clone(&shared));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = Arc::clone(&shared);
        let http = http.clone();
        tokio::spawn(
            async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(error = %e, "TLS handshake failed");
                            shared
                                .metrics
                                .refusals
                                .with_label_values(&["TLS_HANDSHAKE"])
                                .inc();
                            return;
                        }
                        Err(_) => {
                            debug!("TLS handshake timed out");
                            return;
                        }
                    };
                let native = tls.get_ref().1.alpn_protocol() == Some(ALPN_NATIVE);
                if native {
                    let (r, w) = tokio::io::split(tls);
                    serve_native(shared, r, w, "tcp", peer).await;
                } else {
                    let svc = TowerToHyperService::new(http);
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                        debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
            }
            .instrument(info_span!("tcp", %peer)),
        );
    }
}

pub(crate) async fn quic_accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = Arc::clone(&shared);
        let peer = incoming.remote_address();
        tokio::spawn(
            async move {
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        debug!(error = %e, "QUIC handshake failed");
                        shared
                            .metrics
                            .refusals
                            .with_label_values(&["TLS_HANDSHAKE"])
                            .inc();
                        return;
                    }
                    Err(_) => return,
                };
                let alpn = conn
                    .handshake_data()
                    .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|h| h.protocol);
                if alpn.as_deref() == Some(fem_proto::ALPN_FEDERATION) {
                    crate::federation::accept(shared, conn).await;
                    return;
                }
                let Ok(Ok((send, recv))) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await
                else {
                    conn.close(1u32.into(), b"no stream");
                    return;
                };
                serve_native(shared, recv, send, "quic", peer).await;
                // Let the peer read our last frames and close first.
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                conn.close(0u32.into(), b"bye");
            }
            .instrument(info_span!("quic", %peer)),
        );
    }
}

async fn serve_native<R, W>(
    shared: Arc<Shared>,
    r: R,
    w: W,
    transport: &'static str,
    peer: SocketAddr,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return deny(
            &shared,
            w,
            ErrorCode::ShuttingDown,
            "broker is shutting down".into(),
        )
        .await;
    }
    let permit: Option<OwnedSemaphorePermit> =
        Arc::clone(&shared.conn_limit).try_acquire_owned().ok();
    if permit.is_none() {
        let reason = format!(
            "connection limit of {} reached",
            shared.config.max_connections
        );
        return deny(&shared, w, ErrorCode::TooManyConnections, reason).await;
    }
    let r = counted::Counted::new(r, shared.metrics.bytes_received.clone());
    let w = counted::Counted::new(w, shared.metrics.bytes_sent.clone());
    session::run(shared, r, w, transport, peer).await;
    drop(permit);
}

/// Refuses a connection before registration: one Denied frame, then close.
async fn deny<W: AsyncWrite + Unpin>(shared: &Shared, w: W, code: ErrorCode, reason: String) {
    shared
        .metrics
        .refusals
        .with_label_values(&[code.as_str()])
        .inc();
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Frame::Denied { code, reason });
    drop(tx);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        write_loop(rx, w, shared.config.max_frame),
    )
    .await;
}
