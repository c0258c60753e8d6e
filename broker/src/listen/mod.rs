//! Listeners: QUIC on UDP and TLS on TCP, the same port number; ALPN picks
//! the native protocol or HTTP on TCP.
//!
//! Every phase of a connection is bounded in count and time: a connection
//! holds one of `--max-pending-connections` from accept until it registers
//! (handshake within `--handshake-timeout`, registration within
//! `--registration-timeout`), then one of `--max-connections`; an HTTPS
//! connection holds one of `--max-http-connections` and is closed when no
//! request is in progress for `--http-idle-timeout` (`--http-header-timeout`
//! before its first request).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use fem_net::wire::write_loop;
use fem_proto::{ALPN_NATIVE, ErrorCode, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tower::ServiceExt as _;
use tracing::{Instrument as _, debug, info_span, warn};

use crate::state::Shared;

pub(crate) mod counted;
pub(crate) mod gateway;
pub(crate) mod http;
mod session;

/// A TLS or QUIC handshake within `--handshake-timeout`; failures and
/// timeouts are counted and end the connection (`None`).
async fn handshake<T, E: std::fmt::Display>(
    shared: &Shared,
    what: &'static str,
    fut: impl IntoFuture<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(shared.config.limits.handshake_timeout, fut).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            debug!(error = %e, what, "handshake failed");
            shared.metrics.refused("TLS_HANDSHAKE");
            None
        }
        Err(_) => {
            debug!(what, "handshake timed out");
            shared.metrics.limit_hit("handshake_timeout");
            None
        }
    }
}

/// A slot among connections that have not registered yet.
fn pending_slot(shared: &Shared) -> Option<OwnedSemaphorePermit> {
    let permit = Arc::clone(&shared.pending_limit).try_acquire_owned().ok();
    if permit.is_none() {
        shared.metrics.limit_hit("max_pending_connections");
    }
    permit
}

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
        // Over the budget of unregistered connections: closed at once, before
        // any handshake work (the client retries with backoff).
        let Some(pending) = pending_slot(&shared) else {
            debug!(%peer, "too many connections pending registration; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = Arc::clone(&shared);
        let http = http.clone();
        tokio::spawn(
            async move {
                let Some(tls) = handshake(&shared, "TLS", acceptor.accept(stream)).await else {
                    return;
                };
                let native = tls.get_ref().1.alpn_protocol() == Some(ALPN_NATIVE);
                if native {
                    let (r, w) = tokio::io::split(tls);
                    serve_native(shared, r, w, "tcp", peer, pending).await;
                } else {
                    drop(pending);
                    let Ok(permit) = Arc::clone(&shared.http_limit).try_acquire_owned() else {
                        shared.metrics.limit_hit("max_http_connections");
                        debug!("HTTP connection limit reached; closed");
                        return;
                    };
                    serve_http(&shared, tls, http).await;
                    drop(permit);
                }
            }
            .instrument(info_span!("tcp", %peer)),
        );
    }
}

/// When the connection's last request ended, and how many are in progress.
#[derive(Debug, Default)]
struct Activity {
    in_progress: AtomicUsize,
    served: AtomicU64,
    /// ms since the epoch of the last request's end (or the connection's start).
    last_end_ms: AtomicU64,
}

/// Ends a request's activity when dropped (answered or abandoned).
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0
            .last_end_ms
            .store(fem_proto::now_ms(), Ordering::Relaxed);
        self.0.served.fetch_add(1, Ordering::Relaxed);
        self.0.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one TLS connection until it ends or stays
/// idle past its limit.
async fn serve_http<I>(shared: &Shared, io: I, router: axum::Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.config.limits;
    let activity = Arc::new(Activity::default());
    activity
        .last_end_ms
        .store(fem_proto::now_ms(), Ordering::Relaxed);
    let act = Arc::clone(&activity);
    let svc = tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        act.in_progress.fetch_add(1, Ordering::Relaxed);
        let guard = InProgress(Arc::clone(&act));
        let answer = router.clone().oneshot(req);
        async move {
            let r = answer.await;
            drop(guard);
            r
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.http_header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(64 * 1024);
    let conn = builder.serve_connection(
        TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(svc),
    );
    tokio::pin!(conn);
    let mut check =
        tokio::time::interval(Duration::from_millis(250).min(limits.http_header_timeout));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = check.tick() => {}
        }
        if activity.in_progress.load(Ordering::Relaxed) > 0 {
            continue;
        }
        let (limit, name) = if activity.served.load(Ordering::Relaxed) == 0 {
            (limits.http_header_timeout, "http_header_timeout")
        } else {
            (limits.http_idle_timeout, "http_idle_timeout")
        };
        let idle = fem_proto::now_ms().saturating_sub(activity.last_end_ms.load(Ordering::Relaxed));
        if u128::from(idle) >= limit.as_millis() {
            debug!(limit = name, "HTTP connection idle; closing");
            shared.metrics.limit_hit(name);
            conn.as_mut().graceful_shutdown();
            // A peer that does not finish closing is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await;
            return;
        }
    }
}

pub(crate) async fn quic_accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(pending) = pending_slot(&shared) else {
            incoming.refuse();
            continue;
        };
        let shared = Arc::clone(&shared);
        let peer = incoming.remote_address();
        tokio::spawn(
            async move {
                let Some(conn) = handshake(&shared, "QUIC", incoming).await else {
                    return;
                };
                let alpn = conn
                    .handshake_data()
                    .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|h| h.protocol);
                if alpn.as_deref() == Some(fem_proto::ALPN_FEDERATION) {
                    drop(pending);
                    crate::federation::accept(shared, conn).await;
                    return;
                }
                let limit = shared.config.limits.handshake_timeout;
                let Ok(Ok((send, recv))) = tokio::time::timeout(limit, conn.accept_bi()).await
                else {
                    shared.metrics.limit_hit("handshake_timeout");
                    conn.close(1u32.into(), b"no stream");
                    return;
                };
                serve_native(shared, recv, send, "quic", peer, pending).await;
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
    pending: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    if shared.draining.load(Ordering::Relaxed) {
        return deny(
            &shared,
            w,
            ErrorCode::ShuttingDown,
            "broker is shutting down".into(),
        )
        .await;
    }
    let r = counted::Counted::new(r, shared.metrics.bytes_received.clone());
    let w = counted::Counted::new(w, shared.metrics.bytes_sent.clone());
    session::run(shared, r, w, transport, peer, pending).await;
}

/// Refuses a connection before registration: one Denied frame, then close.
async fn deny<W: AsyncWrite + Unpin>(shared: &Shared, w: W, code: ErrorCode, reason: String) {
    shared.metrics.refused(code.as_str());
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Frame::Denied { code, reason });
    drop(tx);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        write_loop(rx, w, shared.config.max_frame),
    )
    .await;
}
