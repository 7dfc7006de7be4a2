//! [`Producer`], [`SendOptions`] and [`SendOutcome`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fmq_proto::{Command, Frame};
use tokio::sync::Mutex;

use super::connection::{is_transient, send_frame};
use super::outbox::SendRecord;
use super::session::{SessionMode, SessionShared};
use super::DUPLICATE_HEADER;
use crate::error::{Error, Result};

/// Delivery settings of a send: used per send, or as a producer's defaults
/// (a per-send setting wins; headers are merged, per-send values winning).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOptions {
    /// Persistent (`persistent:true`: stored, receipted, buffered while
    /// disconnected, once-only) or not (sent without a receipt, lost if no
    /// server is connected). Unset means persistent, as in JMS.
    pub persistent: Option<bool>,
    /// Priority 0 (lowest) to 9; unset is the broker's default (4).
    pub priority: Option<u8>,
    /// Time to live, counted from the send (the `expires` header); a
    /// buffered message keeps its original expiry. Unset never expires.
    pub time_to_live: Option<Duration>,
    /// Application headers (properties a selector can test).
    pub headers: Vec<(String, String)>,
}

impl SendOptions {
    /// No settings: persistent, default priority, no expiry.
    pub fn new() -> SendOptions {
        SendOptions::default()
    }

    /// Sets persistence.
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = Some(persistent);
        self
    }

    /// Sets the priority (0 to 9).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the time to live.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = Some(ttl);
        self
    }

    /// Adds an application header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// These options over `defaults`.
    fn over(&self, defaults: &SendOptions) -> SendOptions {
        let mut headers: Vec<(String, String)> = defaults
            .headers
            .iter()
            .filter(|(k, _)| !self.headers.iter().any(|(n, _)| n == k))
            .cloned()
            .collect();
        headers.extend(self.headers.iter().cloned());
        SendOptions {
            persistent: self.persistent.or(defaults.persistent),
            priority: self.priority.or(defaults.priority),
            time_to_live: self.time_to_live.or(defaults.time_to_live),
            headers,
        }
    }
}

/// What became of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendOutcome {
    /// The broker stored the message and receipted it.
    Receipted,
    /// The broker receipted the send as a duplicate of one it already had
    /// (same producer id and sequence): it is stored once.
    Duplicate,
    /// No server took it yet: it is in the local buffer (on disk when the
    /// connection has a buffer directory) and will be delivered in order.
    Buffered,
    /// A non-persistent message was handed to the connection (no receipt).
    Written,
    /// The send is part of the session's open transaction and takes effect
    /// at commit.
    InTransaction,
}

/// Sends messages to a destination, on behalf of a [`Session`].
///
/// A producer's sends are made one at a time, in order: concurrent calls
/// on one producer wait for each other. Persistent sends carry the
/// producer's id and a sequence number (see [`Session::producer`]).
///
/// [`Session`]: super::Session
/// [`Session::producer`]: super::Session::producer
#[derive(Debug)]
pub struct Producer {
    session: Arc<SessionShared>,
    name: String,
    key: String,
    id: String,
    destination: String,
    defaults: SendOptions,
    order: Mutex<()>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Producer {
    pub(crate) async fn new(
        session: Arc<SessionShared>,
        name: &str,
        destination: &str,
    ) -> Result<Producer> {
        if name.is_empty() {
            return Err(Error::Usage("a producer needs a name".into()));
        }
        let inner = session.inner();
        let client_id = inner.config.client_id.clone();
        let key = format!("{}/{name}", client_id.as_deref().unwrap_or(""));
        let outbox = inner.outbox.clone();
        let (k, n) = (key.clone(), name.to_owned());
        let id =
            tokio::task::spawn_blocking(move || outbox.producer_id(&k, client_id.as_deref(), &n))
                .await
                .map_err(|e| Error::Buffer(e.to_string()))??;
        Ok(Producer {
            session,
            name: name.to_owned(),
            key,
            id,
            destination: destination.to_owned(),
            defaults: SendOptions::default(),
            order: Mutex::new(()),
        })
    }

    /// The producer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The producer id its persistent sends carry (`fmq-producer-id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The default destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The default send options.
    pub fn defaults(&self) -> &SendOptions {
        &self.defaults
    }

    /// Replaces the default send options.
    pub fn set_defaults(&mut self, defaults: SendOptions) {
        self.defaults = defaults;
    }

    /// Sends `body` to the default destination with the default options.
    pub async fn send(&self, body: impl Into<Bytes>) -> Result<SendOutcome> {
        self.send_to(&self.destination.clone(), body, &SendOptions::default())
            .await
    }

    /// Sends `body` to the default destination with `options` over the
    /// defaults.
    pub async fn send_with(
        &self,
        body: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<SendOutcome> {
        self.send_to(&self.destination.clone(), body, &options)
            .await
    }

    /// Sends `body` to `destination` with `options` over the defaults.
    ///
    /// A persistent send returns once the broker receipted it, or once it
    /// is in the local buffer ([`SendOutcome::Buffered`]): when no server
    /// is connected, when the buffer still holds earlier sends, or when the
    /// connection dropped before the RECEIPT. It fails when the broker
    /// refuses it (e.g. no permission: [`Error::Server`]), when the buffer
    /// is full ([`Error::BufferFull`]) or cannot be written. A
    /// non-persistent send fails when no server is connected within the
    /// request timeout. In a transacted session the send joins the open
    /// transaction.
    pub async fn send_to(
        &self,
        destination: &str,
        body: impl Into<Bytes>,
        options: &SendOptions,
    ) -> Result<SendOutcome> {
        let inner = self.session.inner();
        if inner.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        let options = options.over(&self.defaults);
        let persistent = options.persistent.unwrap_or(true);
        let headers = self.headers(&options, persistent)?;
        let body = body.into();
        let _order = self.order.lock().await;
        if !persistent {
            let mut frame = Frame::new(Command::Send).header("destination", destination);
            for (k, v) in &headers {
                frame.headers.push(k.as_str(), v.as_str());
            }
            let frame = frame.with_body(body);
            if let Some(tx) = &self.session.tx {
                tx.lock().await.send(inner, frame).await?;
                return Ok(SendOutcome::InTransaction);
            }
            let link = inner.wait_link(inner.config.request_timeout).await?;
            link.client.write(frame).await?;
            return Ok(SendOutcome::Written);
        }
        let sequence = self.next_sequence().await?;
        let record = SendRecord {
            producer_id: self.id.clone(),
            sequence,
            destination: destination.to_owned(),
            headers,
            body,
        };
        if let Some(tx) = &self.session.tx {
            debug_assert_eq!(self.session.mode, SessionMode::Transacted);
            tx.lock().await.send(inner, send_frame(&record)).await?;
            return Ok(SendOutcome::InTransaction);
        }
        if inner.outbox.is_direct() {
            if let Some(link) = inner.link() {
                match link.client.start_request(send_frame(&record)).await {
                    Ok(pending) => {
                        let receipt = pending.receipt().to_owned();
                        let deadline = tokio::time::Instant::now() + inner.config.request_timeout;
                        match pending.wait_until(deadline).await {
                            Ok(frame) if frame.get(DUPLICATE_HEADER) == Some("true") => {
                                return Ok(SendOutcome::Duplicate)
                            }
                            Ok(_) => return Ok(SendOutcome::Receipted),
                            Err(e) if link.client.refused(&receipt) && !is_transient(&e) => {
                                return Err(e)
                            }
                            Err(e) => {
                                // Lost (or a server too slow to answer, taken
                                // for failed): keep it for the next connection.
                                tracing::debug!(error = %e, sequence, "send not receipted; buffering it");
                                link.client.abort(e);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, sequence, "send not possible; buffering it");
                        if !e.is_connection_loss() {
                            link.client.abort(e);
                        }
                    }
                }
            }
        }
        let outbox = inner.outbox.clone();
        tokio::task::spawn_blocking(move || outbox.append(record))
            .await
            .map_err(|e| Error::Buffer(e.to_string()))??;
        Ok(SendOutcome::Buffered)
    }

    /// The SEND headers for `options`, validated.
    fn headers(&self, options: &SendOptions, persistent: bool) -> Result<Vec<(String, String)>> {
        let mut headers = Vec::with_capacity(options.headers.len() + 3);
        for (k, v) in &options.headers {
            if matches!(
                k.as_str(),
                "destination"
                    | "receipt"
                    | "transaction"
                    | "content-length"
                    | "persistent"
                    | "priority"
                    | "expires"
                    | super::PRODUCER_ID_HEADER
                    | super::SEQUENCE_HEADER
            ) {
                return Err(Error::Usage(format!(
                    "header {k} is set by the producer, not by the application"
                )));
            }
            headers.push((k.clone(), v.clone()));
        }
        headers.push(("persistent".into(), persistent.to_string()));
        if let Some(p) = options.priority {
            if p > 9 {
                return Err(Error::Usage(format!("priority {p} is not from 0 to 9")));
            }
            headers.push(("priority".into(), p.to_string()));
        }
        if let Some(ttl) = options.time_to_live {
            let expires = now_ms().saturating_add(ttl.as_millis() as u64).max(1);
            headers.push(("expires".into(), expires.to_string()));
        }
        Ok(headers)
    }

    async fn next_sequence(&self) -> Result<u64> {
        let outbox = &self.session.inner().outbox;
        if let Some(n) = outbox.try_next_sequence(&self.key) {
            return Ok(n);
        }
        let outbox = outbox.clone();
        let key = self.key.clone();
        tokio::task::spawn_blocking(move || outbox.next_sequence(&key))
            .await
            .map_err(|e| Error::Buffer(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_send_options_win_over_defaults() {
        let defaults = SendOptions::new()
            .priority(2)
            .header("region", "eu")
            .header("kind", "invoice")
            .time_to_live(Duration::from_secs(60));
        let merged = SendOptions::new()
            .persistent(false)
            .header("region", "us")
            .over(&defaults);
        assert_eq!(merged.persistent, Some(false));
        assert_eq!(merged.priority, Some(2));
        assert_eq!(merged.time_to_live, Some(Duration::from_secs(60)));
        assert_eq!(
            merged.headers,
            [
                ("kind".to_owned(), "invoice".to_owned()),
                ("region".to_owned(), "us".to_owned())
            ]
        );
        assert_eq!(
            SendOptions::new().over(&SendOptions::new()).persistent,
            None
        );
    }
}
