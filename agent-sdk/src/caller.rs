//! The [`Client`] handle: calls, discovery, events and subscriptions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fem_proto::{
    AgentId, Body, Capability, CapabilityPattern, DiscoverTools, DiscoveredTool, EmbodimentUpdate,
    EmitEvent, Envelope, ErrorCode, Frame, Header, JsonText, Nonce, ProgressUpdate, PublicKey,
    RequestId, Revoke, SigningKey, Target, ToolCall,
};
use tokio::sync::{mpsc, oneshot};

use crate::connection::{Inner, PendingCall, Sealing, Subscriber, lock};
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
    /// The broker that vouched for `sender` when the event came unsigned
    /// (only on [`Client::subscribe_accepting_attested`]); `None` when the
    /// sender's signature verified.
    pub attested_by: Option<AgentId>,
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
        self.call_inner(target, tool, params, timeout, None, false)
            .await
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
        self.call_inner(target, tool, params, timeout, Some(progress), false)
            .await
    }

    /// As [`Client::call_with_timeout`], sent unsigned: the broker attests
    /// this client's identity to the agent, and the result comes back
    /// unsigned too (broker-attested mode, proto/README.md §8.14). No
    /// signature work anywhere on the call's path; only tools that declare
    /// they accept such calls take them (others answer PERMISSION_DENIED).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_attested(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, CallError> {
        self.call_inner(target, tool, params, timeout, None, true)
            .await
    }

    async fn call_inner(
        &self,
        target: Target,
        tool: &str,
        params: serde_json::Value,
        timeout: Duration,
        progress: Option<mpsc::Sender<ProgressUpdate>>,
        attested: bool,
    ) -> Result<serde_json::Value, CallError> {
        let tool = Capability::new(tool)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let request_id = RequestId::random();
        let deadline_ms =
            fem_proto::now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX / 2);
        let (frame, _) = self.seal(
            Body::ToolCall(ToolCall {
                request_id,
                target,
                tool,
                parameters: JsonText::from_value(&params),
                deadline_ms,
                audience: lock(&self.inner.broker_id).clone(),
            }),
            attested,
        )?;
        self.request(request_id, frame, timeout, progress, attested)
            .await
    }

    /// The envelope of `body` as the frame that sends it: signed, or
    /// unsigned for the broker to attest; with its header's nonce. Refused
    /// TOO_LARGE when the broker could not forward it.
    fn seal(&self, body: Body, attested: bool) -> Result<(Frame, Nonce), CallError> {
        let env = Envelope::new(Header::now(self.inner.id.clone()), body);
        let nonce = env.header.nonce;
        let how = Sealing {
            format: fem_proto::Format::Postcard,
            attested,
        };
        let (frame, size) = self
            .inner
            .seal(&env, how)
            .map_err(|e| CallError::local(ErrorCode::Internal, e.to_string()))?;
        let max = self
            .inner
            .max_envelope
            .load(std::sync::atomic::Ordering::Relaxed);
        if size > max {
            return Err(CallError::local(
                ErrorCode::TooLarge,
                format!("the request is {size} bytes encoded; the broker forwards at most {max}"),
            ));
        }
        Ok((frame, nonce))
    }

    async fn request(
        &self,
        request_id: RequestId,
        frame: Frame,
        timeout: Duration,
        progress: Option<mpsc::Sender<ProgressUpdate>>,
        attested: bool,
    ) -> Result<serde_json::Value, CallError> {
        let (epoch, writer) = self.connection()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(
            request_id,
            PendingCall {
                epoch,
                tx,
                progress,
                attested,
            },
        );
        let mut unanswered = CancelOnDrop {
            inner: &self.inner,
            request_id,
            epoch,
            armed: true,
        };
        if writer.send(frame).await.is_err() {
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
        let (frame, _) = self.seal(
            Body::DiscoverTools(DiscoverTools {
                request_id,
                capability,
                environment: None,
                limit,
                cursor,
            }),
            false,
        )?;
        let v = self
            .request(request_id, frame, self.inner.opts.call_timeout, None, false)
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

    async fn send_acked(&self, body: Body, attested: bool) -> Result<(), CallError> {
        let (frame, nonce) = self.seal(body, attested)?;
        self.acked(nonce, frame).await
    }

    /// Publishes an event on `topic`.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn emit(&self, topic: &str, payload: serde_json::Value) -> Result<(), CallError> {
        self.emit_inner(topic, payload, false).await
    }

    /// Publishes an event on `topic` unsigned, attested by the broker: only
    /// subscribers that accept attested events
    /// ([`Client::subscribe_accepting_attested`]) receive it.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn emit_attested(
        &self,
        topic: &str,
        payload: serde_json::Value,
    ) -> Result<(), CallError> {
        self.emit_inner(topic, payload, true).await
    }

    async fn emit_inner(
        &self,
        topic: &str,
        payload: serde_json::Value,
        attested: bool,
    ) -> Result<(), CallError> {
        let topic = Capability::new(topic)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let body = Body::EmitEvent(EmitEvent {
            topic,
            payload: JsonText::from_value(&payload),
        });
        self.send_acked(body, attested).await
    }

    /// Subscribes to `topic`; events arrive on the returned channel (kept
    /// across reconnections). Only events signed by their sender arrive.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<Event>, CallError> {
        self.subscribe_inner(topic, false).await
    }

    /// As [`Client::subscribe`], also taking broker-attested events (their
    /// [`Event::attested_by`] names the broker that vouched for the sender).
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn subscribe_accepting_attested(
        &self,
        topic: &str,
    ) -> Result<mpsc::Receiver<Event>, CallError> {
        self.subscribe_inner(topic, true).await
    }

    async fn subscribe_inner(
        &self,
        topic: &str,
        attested: bool,
    ) -> Result<mpsc::Receiver<Event>, CallError> {
        let topic = Capability::new(topic)
            .map_err(|e| CallError::local(ErrorCode::BadRequest, e.to_string()))?;
        let (tx, rx) = mpsc::channel(256);
        lock(&self.inner.subs)
            .entry(topic.clone())
            .or_default()
            .push(Subscriber { tx, attested });
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
        self.send_acked(
            Body::EmbodimentUpdate(EmbodimentUpdate {
                tools: specs,
                capabilities: None,
                metadata: None,
            }),
            false,
        )
        .await
    }

    /// Removes this agent from the mesh and closes the connection.
    ///
    /// # Errors
    /// A [`CallError`].
    pub async fn revoke(&self, reason: &str) -> Result<(), CallError> {
        let r = self
            .send_acked(
                Body::Revoke(Revoke {
                    target: self.inner.id.clone(),
                    reason: reason.to_owned(),
                }),
                false,
            )
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
