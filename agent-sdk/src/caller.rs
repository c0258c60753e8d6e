//! The [`Client`] handle: calls, discovery, events and subscriptions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fem_proto::{
    AgentId, Body, Capability, CapabilityPattern, DiscoverTools, DiscoveredTool, EmbodimentUpdate,
    EmitEvent, Envelope, ErrorCode, Frame, Header, JsonText, Nonce, ProgressUpdate, PublicKey,
    RequestId, Revoke, SignedEnvelope, SigningKey, Target, ToolCall,
};
use tokio::sync::{mpsc, oneshot};

use crate::connection::{Inner, PendingCall, lock};
use crate::{AgentBuilder, CallError, Options, SdkError, Tool};

/// An event received on a subscribed topic.
#[derive(Clone, Debug)]
pub struct Event {
    /// Who emitted it.
    pub sender: AgentId,
    /// Topic.
    pub topic: Capability,
    /// Payload.
    pub payload: serde_json::Value,
}

/// A connected agent or caller. Cheap to clone; the connection lives in a
/// background task and closes when the last clone is dropped or on [`Client::close`].
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    pub(crate) _guard: Arc<CloseOnDrop>,
}

#[derive(Debug)]
pub(crate) struct CloseOnDrop(pub(crate) tokio::sync::watch::Sender<bool>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// A call waiting for its answer: if it is dropped (or gives up) first, it
/// leaves the pending table and the broker is asked to cancel it.
struct CancelOnDrop<'a> {
    inner: &'a Inner,
    request_id: RequestId,
    epoch: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed || lock(&self.inner.pending).remove(&self.request_id).is_none() {
            return;
        }
        if let Some(w) = self.inner.writer(self.epoch) {
            let _ = w.try_send(Frame::Cancel {
                request_id: self.request_id,
            });
        }
    }
}

impl Client {
    /// Connects a pure caller (no tools).
    ///
    /// # Errors
    /// As [`AgentBuilder::connect`].
    pub async fn connect(id: AgentId, key: SigningKey, opts: Options) -> Result<Self, SdkError> {
        AgentBuilder::new(id, key)
            .max_concurrent(0)
            .connect(opts)
            .await
    }

    /// This client's agent id.
    pub fn id(&self) -> &AgentId {
        &self.inner.id
    }

    /// This client's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.key.public_key()
    }

    /// True while registered with a broker.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.writer).is_some()
    }

    /// Waits until registered (after a reconnect), up to `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.is_connected() {
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn sign(&self, body: Body) -> Result<SignedEnvelope, CallError> {
        let env = Envelope::new(Header::now(self.inner.id.clone()), body);
        SignedEnvelope::sign(&env, &self.inner.key)
            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))
    }

    /// The current connection's epoch and writer.
    fn connection(&self) -> Result<(u64, mpsc::Sender<Frame>), CallError> {
        lock(&self.inner.writer).clone().ok_or_else(|| {
            CallError::local(ErrorCode::AgentUnavailable, "not connected to the broker")
        })
    }

    /// Calls `tool` on `target` with the default deadline.
    ///
    /// # Errors
    /// A [`CallError`]: from the broker (NO_ROUTE, TIMEOUT, AGENT_UNAVAILABLE,
    /// RATE_LIMITED, ...), the agent (BAD_REQUEST, PERMISSION_DENIED,
    /// TOOL_FAILED, ...) or locally (not connected).
    pub async fn call(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        self.call_with_timeout(target, tool, params, self.inner.opts.call_timeout)
            .await
    }

    /// Calls `tool` on `target`; the broker answers TIMEOUT at the deadline.
    /// Dropping the future before the answer cancels the call: the broker
    /// answers it `CANCELLED` and the agent running it is told to stop.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_with_timeout(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        self.call_inner(target, tool, params, timeout, None).await
    }

    /// As [`Client::call_with_timeout`], sending the progress the agent
    /// reports to `progress` as it comes (updates are dropped while the
    /// channel is full).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_with_progress(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
        timeout: Duration,
        progress: mpsc::Sender<ProgressUpdate>,
    ) -> Result<serde_json::Value, CallError> {
        self.call_inner(target, tool, params, timeout, Some(progress))
            .await
    }

    async fn call_inner(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
        timeout: Duration,
        progress: Option<mpsc::Sender<ProgressUpdate>>,
    ) -> Result<serde_json::Value, CallError> {
        let tool = Capability::new(tool)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let request_id = RequestId::random();
        let deadline_ms =
            fem_proto::now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX / 2);
        let signed = self.sign(Body::ToolCall(ToolCall {
            request_id,
            target,
            tool,
            parameters: JsonText::from_value(&params),
            deadline_ms,
            audience: lock(&self.inner.broker_id).clone(),
        }))?;
        self.request(request_id, signed, timeout, progress).await
    }

    async fn request(
        &self,
        request_id: RequestId,
        signed: SignedEnvelope,
        timeout: Duration,
        progress: Option<mpsc::Sender<ProgressUpdate>>,
    ) -> Result<serde_json::Value, CallError> {
        let max = self
            .inner
            .max_envelope
            .load(std::sync::atomic::Ordering::Relaxed);
        if signed.bytes.len() > max {
            return Err(CallError::local(
                ErrorCode::TooLarge,
                format!(
                    "the request is {} bytes encoded; the broker forwards at most {max}",
                    signed.bytes.len()
                ),
            ));
        }
        let (epoch, writer) = self.connection()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(
            request_id,
            PendingCall {
                epoch,
                tx,
                progress,
            },
        );
        let mut unanswered = CancelOnDrop {
            inner: &self.inner,
            request_id,
            epoch,
            armed: true,
        };
        if writer.send(Frame::Envelope(signed)).await.is_err() {
            return Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            ));
        }
        // The broker answers TIMEOUT at the deadline; the local timer only
        // guards against a broker that never answers.
        match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
            Ok(Ok(r)) => {
                unanswered.armed = false;
                r
            }
            Ok(Err(_)) => Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            )),
            Err(_) => Err(CallError::local(
                ErrorCode::Timeout,
                "no answer from the broker",
            )),
        }
    }

    /// Lists tools whose agents have a capability matching `capability`,
    /// at most `limit` (0: all), following the broker's pages.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn discover(
        &self,
        capability: Option<CapabilityPattern>,
        limit: u32,
    ) -> Result<Vec<DiscoveredTool>, CallError> {
        let want = if limit == 0 {
            usize::MAX
        } else {
            limit as usize
        };
        let mut all = Vec::new();
        let mut cursor = None;
        // Pages are bounded by the broker; so is the number we ask for.
        for _ in 0..10_000 {
            let left = u32::try_from(want - all.len()).unwrap_or(0);
            let (page, next) = self
                .discover_page(capability.clone(), left, cursor.take())
                .await?;
            all.extend(page);
            match next {
                Some(c) if all.len() < want => cursor = Some(c),
                _ => break,
            }
        }
        all.truncate(want);
        Ok(all)
    }

    /// One page of [`Self::discover`]: up to `limit` tools (0: the broker's
    /// page size) after `cursor`, and the cursor of the next page if any.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn discover_page(
        &self,
        capability: Option<CapabilityPattern>,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<(Vec<DiscoveredTool>, Option<String>), CallError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            tools: Vec<DiscoveredTool>,
            next_cursor: Option<String>,
        }
        let request_id = RequestId::random();
        let signed = self.sign(Body::DiscoverTools(DiscoverTools {
            request_id,
            capability,
            environment: None,
            limit,
            cursor,
        }))?;
        let v = self
            .request(request_id, signed, self.inner.opts.call_timeout, None)
            .await?;
        let page: Page = serde_json::from_value(v)
            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))?;
        Ok((page.tools, page.next_cursor))
    }

    async fn acked(&self, nonce: Nonce, frame: Frame) -> Result<(), CallError> {
        let (epoch, writer) = self.connection()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.acks).insert(nonce, (epoch, tx));
        if writer.send(frame).await.is_err() {
            return Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            ));
        }
        match tokio::time::timeout(self.inner.opts.call_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::local(
                ErrorCode::AgentUnavailable,
                "connection closed",
            )),
            Err(_) => {
                lock(&self.inner.acks).remove(&nonce);
                Err(CallError::local(
                    ErrorCode::Timeout,
                    "no acknowledgement from the broker",
                ))
            }
        }
    }

    async fn send_acked(&self, body: Body) -> Result<(), CallError> {
        let signed = self.sign(body)?;
        let nonce = signed
            .open()
            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))?
            .header
            .nonce;
        self.acked(nonce, Frame::Envelope(signed)).await
    }

    /// Publishes an event on `topic`.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn emit(&self, topic: &str, payload: serde_json::Value) -> Result<(), CallError> {
        let topic = Capability::new(topic)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        self.send_acked(Body::EmitEvent(EmitEvent {
            topic,
            payload: JsonText::from_value(&payload),
        }))
        .await
    }

    /// Subscribes to `topic`; events arrive on the returned channel (kept
    /// across reconnections).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<Event>, CallError> {
        let topic = Capability::new(topic)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let (tx, rx) = mpsc::channel(256);
        lock(&self.inner.subs)
            .entry(topic.clone())
            .or_default()
            .push(tx);
        let nonce = Nonce::random();
        self.acked(nonce, Frame::Subscribe { nonce, topic }).await?;
        Ok(rx)
    }

    /// Replaces this agent's tools (embodimentUpdate).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn update_tools(&self, tools: Vec<Tool>) -> Result<(), CallError> {
        let specs = tools.iter().map(|t| t.spec.clone()).collect();
        *lock(&self.inner.tools) = tools
            .into_iter()
            .map(|t| (t.spec.name.clone(), Arc::new(t)))
            .collect();
        self.send_acked(Body::EmbodimentUpdate(EmbodimentUpdate {
            tools: specs,
            capabilities: None,
            metadata: None,
        }))
        .await
    }

    /// Removes this agent from the mesh and closes the connection.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn revoke(&self, reason: &str) -> Result<(), CallError> {
        let r = self
            .send_acked(Body::Revoke(Revoke {
                target: self.inner.id.clone(),
                reason: reason.to_owned(),
            }))
            .await;
        let _ = self.inner.shutdown.send(true);
        r
    }

    /// Starts closing the connection (pending calls fail with AGENT_UNAVAILABLE).
    pub fn close(&self) {
        let _ = self.inner.shutdown.send(true);
    }

    /// Closes the connection and waits (up to 2 s) until the broker has been
    /// told, so it unregisters the agent at once.
    pub async fn shutdown(&self) {
        self.close();
        let mut f = self.inner.finished.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), f.wait_for(|d| *d)).await;
    }
}
