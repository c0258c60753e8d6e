//! Framing over any async byte stream (a QUIC stream or TLS over TCP): the
//! reading half runs fem-proto's [`FrameDecoder`], the writing half batches
//! queued frames into one write.

use fem_proto::{Frame, FrameDecoder, ProtoError, encode_message};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use tokio::sync::mpsc;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream failed, or ended inside a frame.
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame (too large or malformed).
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// Bytes asked of the stream per read while data keeps coming.
const CHUNK: usize = 8 * 1024;

/// Bytes asked of the stream per read while it is quiet: the read buffer is
/// held while waiting for data, and most connections wait most of the time
/// (with 8 KiB each, 10,000 idle agents held 80 MB of buffers).
const SMALL_CHUNK: usize = 512;

/// Consecutive small reads after which a large read buffer is given back
/// (one small read does not mean the stream went quiet: at moderate rates
/// reads alternate between full and small, and each switch is an 8 KiB
/// allocation on the per-message path).
const QUIET_READS: u8 = 16;

/// Write buffers above this are released after use.
const KEEP_BUFFER: usize = 64 * 1024;

/// Reads length-prefixed frames through a [`FrameDecoder`].
///
/// Each read takes at most 8 KiB from the stream, so memory follows the bytes
/// actually received: a declared length is never allocated ahead, and one
/// above the maximum is refused as soon as its 4-byte header has arrived,
/// without reading its payload. The read buffer is 512 bytes while the
/// stream is quiet and 8 KiB from a read that fills it until 16 reads in a
/// row would have fit in 512 bytes.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    chunk: Box<[u8]>,
    /// Small reads in a row into the large buffer.
    small_reads: u8,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream; frames above `max` bytes are refused.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::new(max),
            chunk: vec![0; SMALL_CHUNK].into_boxed_slice(),
            small_reads: 0,
        }
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max(&mut self, max: usize) {
        self.decoder.set_max(max);
    }

    /// The next frame, or `Ok(None)` on a clean end of stream between frames.
    ///
    /// Cancel-safe as far as the stream's `read` is: bytes already read stay
    /// in the decoder for the next call.
    ///
    /// # Errors
    /// [`ReadError::Io`] (including an end of stream inside a frame) or
    /// [`ReadError::Proto`]; the stream is unusable afterwards.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        self.next_message().await
    }

    /// The next frame already received and buffered, without reading the
    /// stream: `Ok(None)` when a whole frame is not buffered yet. Lets a
    /// reader handle frames that arrived together as one batch.
    ///
    /// # Errors
    /// [`ReadError::Proto`]; the stream is unusable afterwards.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, ReadError> {
        Ok(self.decoder.next_frame()?)
    }

    /// The next message of any type (federation links carry `FedFrame`s).
    ///
    /// # Errors
    /// As [`Self::next`].
    pub async fn next_message<T: serde::de::DeserializeOwned>(
        &mut self,
    ) -> Result<Option<T>, ReadError> {
        loop {
            if let Some(message) = self.decoder.next_message()? {
                return Ok(Some(message));
            }
            let n = self.inner.read(&mut self.chunk).await?;
            if n == 0 {
                return match self.decoder.buffered() {
                    0 => Ok(None),
                    partial => Err(ReadError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("stream ended inside a frame ({partial} bytes of it received)"),
                    ))),
                };
            }
            self.decoder.push(&self.chunk[..n]);
            // A full read: more is probably waiting, read it in large
            // chunks. Reads a small buffer would have held, QUIET_READS in
            // a row: the stream has calmed, and the reader waits holding
            // only a small buffer.
            let len = self.chunk.len();
            if n == len && len < CHUNK {
                self.chunk = vec![0; CHUNK].into_boxed_slice();
                self.small_reads = 0;
            } else if len > SMALL_CHUNK {
                if n > SMALL_CHUNK {
                    self.small_reads = 0;
                } else {
                    self.small_reads += 1;
                    if self.small_reads >= QUIET_READS {
                        self.chunk = vec![0; SMALL_CHUNK].into_boxed_slice();
                        self.small_reads = 0;
                    }
                }
            }
        }
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
    let mut last_write: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        out.clear();
        encode_or_log(&first, &mut out, max);
        drain(&mut rx, &mut out, max);
        // Under dense traffic the frame that woke us is usually alone: the
        // tasks producing the next ones (handlers finishing, other callers)
        // are ready but not yet run. Letting them run once before writing
        // turns a write (and, over TLS, a record) per frame into one per
        // burst. Sparse traffic writes at once, so a lone call waits for
        // nothing.
        if last_write.is_some_and(|t| t.elapsed() < DENSE) && out.len() < BATCH_BYTES {
            tokio::task::yield_now().await;
            drain(&mut rx, &mut out, max);
        }
        writer.write_all(&out).await?;
        writer.flush().await?;
        last_write = Some(Instant::now());
        if out.capacity() > KEEP_BUFFER {
            out = Vec::new();
        }
    }
    writer.shutdown().await
}

/// Writes closer together than this count as dense traffic (see [`write_loop`]).
const DENSE: Duration = Duration::from_micros(50);

/// Most bytes gathered into one write.
const BATCH_BYTES: usize = 256 * 1024;

/// Encodes what is queued on `rx` into `out`, up to [`BATCH_BYTES`].
fn drain<T: serde::Serialize>(rx: &mut mpsc::Receiver<T>, out: &mut Vec<u8>, max: usize) {
    while out.len() < BATCH_BYTES {
        match rx.try_recv() {
            Ok(f) => encode_or_log(&f, out, max),
            Err(_) => break,
        }
    }
}

fn encode_or_log<T: serde::Serialize>(frame: &T, out: &mut Vec<u8>, max: usize) {
    if let Err(e) = encode_message(frame, out, max) {
        tracing::warn!(error = %e, "dropping unencodable outgoing frame");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use fem_proto::{DEFAULT_MAX_FRAME, ErrorCode, FedFrame, encode_frame};
    use tokio::io::{AsyncWriteExt as _, duplex};

    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Heartbeat { seq: 1 },
            Frame::Error {
                code: ErrorCode::BadRequest,
                message: "m".repeat(300),
            },
            Frame::HeartbeatAck { seq: u64::MAX },
        ]
    }

    fn stream_of(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            encode_frame(f, &mut out, DEFAULT_MAX_FRAME).unwrap();
        }
        out
    }

    /// Frames written in two pieces split at every byte boundary come out
    /// whole: those complete in the first piece before the second is sent,
    /// the rest after it, then a clean end of stream.
    #[tokio::test]
    async fn frames_split_at_every_byte() {
        let frames = frames();
        let bytes = stream_of(&frames);
        let mut ends = Vec::new();
        let mut at = 0;
        for f in &frames {
            at += stream_of(std::slice::from_ref(f)).len();
            ends.push(at);
        }
        for cut in 0..=bytes.len() {
            let (mut w, r) = duplex(bytes.len());
            let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
            w.write_all(&bytes[..cut]).await.unwrap();
            // Take what the first piece holds, without waiting for more.
            let mut got = Vec::new();
            loop {
                tokio::select! {
                    biased;
                    f = reader.next() => got.push(f.unwrap().unwrap()),
                    () = std::future::ready(()) => break,
                }
            }
            let complete = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(got, frames[..complete], "cut {cut}");
            w.write_all(&bytes[cut..]).await.unwrap();
            drop(w);
            while let Some(f) = reader.next().await.unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames, "cut {cut}");
        }
        // One byte per write.
        let (mut w, r) = duplex(1);
        let writer = tokio::spawn(async move {
            for b in bytes {
                w.write_all(&[b]).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
        for f in &frames {
            assert_eq!(reader.next().await.unwrap().as_ref(), Some(f));
        }
        writer.await.unwrap();
        assert!(reader.next().await.unwrap().is_none());
    }

    /// A header announcing more than the maximum is refused at once: the
    /// writer never sends the payload and the reader does not wait for it.
    #[tokio::test]
    async fn oversized_length_refused_without_reading_it() {
        let (mut w, r) = duplex(1024);
        w.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        w.write_all(b"a few payload bytes").await.unwrap();
        let mut reader = FrameReader::new(r, 1024);
        let got = tokio::time::timeout(Duration::from_secs(5), reader.next())
            .await
            .expect("refused without waiting for the payload");
        assert!(
            matches!(got, Err(ReadError::Proto(ProtoError::TooLarge { len, max: 1024 })) if len == 1 << 30),
            "{got:?}"
        );
        // The writer side is still open: nothing beyond the header was needed.
        drop(w);
    }

    /// A declared length within the maximum is not allocated before its
    /// bytes arrive.
    #[tokio::test]
    async fn declared_length_not_allocated_ahead() {
        let (mut w, r) = duplex(1024);
        let len = u32::try_from(DEFAULT_MAX_FRAME).unwrap();
        w.write_all(&len.to_be_bytes()).await.unwrap();
        w.write_all(&[0; 100]).await.unwrap();
        let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
        let pending = tokio::time::timeout(Duration::from_millis(50), reader.next()).await;
        assert!(pending.is_err(), "waits for the rest of the frame");
        assert_eq!(reader.decoder.buffered(), 104);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let bytes = stream_of(&frames());
        for cut in [1, 3, 4, 5, bytes.len() - 1] {
            let (mut w, r) = duplex(4096);
            w.write_all(&bytes[..cut]).await.unwrap();
            drop(w);
            let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            let err = loop {
                match reader.next().await {
                    Ok(Some(f)) => got.push(f),
                    Ok(None) => panic!("cut {cut}: clean end inside a frame"),
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(&err, ReadError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
                "cut {cut}: {err:?}"
            );
            assert!(got.len() < frames().len());
        }
    }

    #[tokio::test]
    async fn clean_eof_is_none() {
        let (w, r) = duplex(64);
        drop(w);
        let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
        assert!(reader.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn malformed_payload_is_a_proto_error() {
        let (mut w, r) = duplex(64);
        w.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
        let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
        assert!(matches!(
            reader.next().await,
            Err(ReadError::Proto(ProtoError::Malformed { .. }))
        ));
    }

    /// write_loop and next_message carry other message types too.
    #[tokio::test]
    async fn write_loop_to_reader_with_fed_frames() {
        let (w, r) = duplex(256);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_loop(rx, w, DEFAULT_MAX_FRAME));
        let sender = tokio::spawn(async move {
            for seq in 0..100 {
                tx.send(FedFrame::Ping { seq }).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(r, DEFAULT_MAX_FRAME);
        for seq in 0..100 {
            assert_eq!(
                reader.next_message::<FedFrame>().await.unwrap(),
                Some(FedFrame::Ping { seq })
            );
        }
        assert_eq!(reader.next_message::<FedFrame>().await.unwrap(), None);
        sender.await.unwrap();
        writer.await.unwrap().unwrap();
    }
}
