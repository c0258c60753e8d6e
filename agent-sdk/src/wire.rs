//! Async framing over any byte stream (QUIC stream or TLS/TCP), shared by the
//! SDK and the broker.

use fem_proto::{FRAME_HEADER_LEN, Frame, ProtoError, decode_message, encode_message, frame_len};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream failed.
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame (too large or malformed).
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// Read and write buffers above this are released after use.
const KEEP_BUFFER: usize = 64 * 1024;

/// Reads length-prefixed frames, refusing oversized ones before reading them.
///
/// It adds no read buffer of its own: TLS and QUIC streams already hold
/// received data in user space, and a broker keeps one reader per agent.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream; frames above `max` bytes are refused.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// The next frame, or `Ok(None)` on a clean end of stream between frames.
    ///
    /// Not cancel-safe: drop the reader if a read is cancelled.
    ///
    /// # Errors
    /// [`ReadError::Io`] (including EOF inside a frame) or [`ReadError::Proto`].
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        self.next_message().await
    }

    /// The next message of any type (federation links carry `FedFrame`s).
    ///
    /// # Errors
    /// As [`Self::next`].
    pub async fn next_message<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<T>, ReadError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let n = self.inner.read(&mut header[..1]).await?;
        if n == 0 {
            return Ok(None);
        }
        self.inner.read_exact(&mut header[1..]).await?;
        let len = frame_len(header, self.max)?;
        self.buf.clear();
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf).await?;
        let frame = decode_message(&self.buf)?;
        if self.buf.capacity() > KEEP_BUFFER {
            // Do not keep a large buffer alive for an idle connection.
            self.buf = Vec::new();
        }
        Ok(Some(frame))
    }
}

/// Drains `rx` into `writer`, batching queued frames into one write, until
/// the channel closes; then shuts the stream down.
///
/// # Errors
/// I/O errors; an unencodable frame is skipped with a log line.
pub async fn write_loop<W: AsyncWrite + Unpin, T: serde::Serialize>(
    mut rx: mpsc::Receiver<T>,
    mut writer: W,
    max: usize,
) -> std::io::Result<()> {
    // Grows to what the traffic needs; an idle connection keeps a small one.
    let mut out = Vec::new();
    while let Some(first) = rx.recv().await {
        out.clear();
        encode_or_log(&first, &mut out, max);
        while out.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => encode_or_log(&f, &mut out, max),
                Err(_) => break,
            }
        }
        writer.write_all(&out).await?;
        writer.flush().await?;
        if out.capacity() > KEEP_BUFFER {
            out = Vec::new();
        }
    }
    writer.shutdown().await
}

fn encode_or_log<T: serde::Serialize>(frame: &T, out: &mut Vec<u8>, max: usize) {
    if let Err(e) = encode_message(frame, out, max) {
        tracing::warn!(error = %e, "dropping unencodable outgoing frame");
    }
}
