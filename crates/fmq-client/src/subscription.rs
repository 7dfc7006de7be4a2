//! [`Subscription`], its [`SubscribeOptions`] and the [`Message`]s it yields.

use std::time::Duration;

use bytes::Bytes;
use fmq_proto::{Command, Frame, Headers};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::{Error, Result};

/// How the broker learns that a message was consumed (SUBSCRIBE `ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// The broker considers a message consumed once it is written to the
    /// socket; [`Message::ack`] is a no-op.
    #[default]
    Auto,
    /// [`Message::ack`] acknowledges that message and every earlier one
    /// delivered to the subscription.
    Client,
    /// [`Message::ack`] acknowledges exactly that message.
    ClientIndividual,
}

/// Options for [`Client::subscribe`].
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Acknowledgement mode; default [`AckMode::Auto`].
    pub ack: AckMode,
    /// A JMS-style message selector (SQL-92 subset over headers), sent as
    /// the `selector` header.
    pub selector: Option<String>,
    /// Most unacknowledged messages the broker sends ahead
    /// (`activemq.prefetchSize`); `None` uses the broker's default.
    pub prefetch: Option<usize>,
    /// Makes a topic subscription durable under this name
    /// (`activemq.subscriptionName`): the broker keeps its messages while
    /// the client is away. Needs [`ConnectOptions::client_id`].
    ///
    /// [`ConnectOptions::client_id`]: crate::ConnectOptions::client_id
    pub durable_name: Option<String>,
    /// Further SUBSCRIBE headers, sent as given.
    pub headers: Vec<(String, String)>,
}

impl SubscribeOptions {
    /// Default options with the given acknowledgement mode.
    pub fn ack(mode: AckMode) -> Self {
        SubscribeOptions {
            ack: mode,
            ..Default::default()
        }
    }
}

/// An active subscription: a stream of [`Message`]s.
///
/// Dropping it cancels the subscription (a best-effort UNSUBSCRIBE); use
/// [`unsubscribe`](Self::unsubscribe) to wait for the broker.
#[derive(Debug)]
pub struct Subscription {
    /// The subscription id, as sent in SUBSCRIBE `id`.
    pub id: String,
    /// The destination subscribed to.
    pub destination: String,
    client: Client,
    ack: AckMode,
    durable_name: Option<String>,
    rx: mpsc::UnboundedReceiver<Frame>,
    active: bool,
}

impl Subscription {
    pub(crate) fn new(
        client: Client,
        id: String,
        destination: String,
        ack: AckMode,
        durable_name: Option<String>,
        rx: mpsc::UnboundedReceiver<Frame>,
    ) -> Subscription {
        Subscription {
            id,
            destination,
            client,
            ack,
            durable_name,
            rx,
            active: true,
        }
    }

    /// The next message, or `None` once the connection has ended (messages
    /// that arrived before the end are still returned first).
    pub async fn next(&mut self) -> Option<Message> {
        let frame = self.rx.recv().await?;
        Some(self.message(frame))
    }

    /// The next message if one arrives within `timeout`: `Ok(None)` when
    /// none did, `Err` with the connection's error once it has ended.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Message>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(frame)) => Ok(Some(self.message(frame))),
            Ok(None) => Err(self.client.inner.shared.terminal()),
        }
    }

    /// Cancels the subscription and waits for the broker's RECEIPT. A
    /// durable subscription is only detached: the broker keeps collecting
    /// its messages. Unacknowledged messages are redelivered.
    pub async fn unsubscribe(mut self) -> Result<()> {
        self.active = false;
        let frame = Frame::new(Command::Unsubscribe).header("id", self.id.clone());
        let result = self.client.request(frame).await;
        self.client.inner.shared.remove_subscription(&self.id);
        result
    }

    /// Cancels a durable subscription and deletes it on the broker, with
    /// every message it kept (UNSUBSCRIBE with `activemq.subscriptionName`).
    pub async fn unsubscribe_durable(mut self) -> Result<()> {
        let Some(name) = self.durable_name.clone() else {
            return Err(Error::Usage(format!(
                "subscription {} is not durable",
                self.id
            )));
        };
        self.active = false;
        let frame = Frame::new(Command::Unsubscribe)
            .header("id", self.id.clone())
            .header("activemq.subscriptionName", name);
        let result = self.client.request(frame).await;
        self.client.inner.shared.remove_subscription(&self.id);
        result
    }

    fn message(&self, frame: Frame) -> Message {
        let ack_id = (self.ack != AckMode::Auto).then(|| {
            frame
                .get("ack")
                .or_else(|| frame.get("message-id"))
                .unwrap_or("")
                .to_owned()
        });
        Message {
            destination: frame.get("destination").unwrap_or("").to_owned(),
            message_id: frame.get("message-id").unwrap_or("").to_owned(),
            subscription: self.id.clone(),
            redelivered: frame.get("redelivered") == Some("true"),
            headers: frame.headers,
            body: frame.body,
            ack_id,
            client: self.client.clone(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.active {
            self.client.inner.shared.remove_subscription(&self.id);
            self.client
                .try_write(Frame::new(Command::Unsubscribe).header("id", self.id.clone()));
        }
    }
}

/// A message delivered to a [`Subscription`].
#[derive(Debug, Clone)]
pub struct Message {
    /// The destination it was sent to.
    pub destination: String,
    /// The broker's `message-id`.
    pub message_id: String,
    /// Id of the subscription it was delivered to.
    pub subscription: String,
    /// Every MESSAGE header, including the application's own.
    pub headers: Headers,
    /// The body.
    pub body: Bytes,
    /// Whether the broker delivered it before (`redelivered:true`).
    pub redelivered: bool,
    /// The `ack` header to echo in ACK/NACK `id`; `None` in auto mode.
    ack_id: Option<String>,
    client: Client,
}

impl Message {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The body as UTF-8 text, if it is.
    pub fn body_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// Acknowledges the message (in [`AckMode::Client`] also every earlier
    /// one of the subscription) without waiting for the broker. A no-op on
    /// an `auto` subscription.
    pub async fn ack(&self) -> Result<()> {
        match &self.ack_id {
            None => Ok(()),
            Some(id) => {
                self.client
                    .write(Client::ack_frame(Command::Ack, id, None))
                    .await
            }
        }
    }

    /// Like [`ack`](Self::ack), but waits for the broker's RECEIPT, i.e.
    /// until the acknowledgement is stored.
    pub async fn ack_with_receipt(&self) -> Result<()> {
        match &self.ack_id {
            None => Ok(()),
            Some(id) => {
                self.client
                    .request(Client::ack_frame(Command::Ack, id, None))
                    .await
            }
        }
    }

    /// Rejects the message: the broker redelivers it (with
    /// `redelivered:true`) or, after too many attempts, moves it to the
    /// dead-letter queue. Not possible on an `auto` subscription.
    pub async fn nack(&self) -> Result<()> {
        let id = self.ack_id_for("NACK")?;
        self.client
            .write(Client::ack_frame(Command::Nack, id, None))
            .await
    }

    /// Like [`nack`](Self::nack), but waits (up to `timeout`) for the
    /// broker's RECEIPT, i.e. until the rejection is applied.
    pub(crate) async fn nack_within(&self, timeout: std::time::Duration) -> Result<()> {
        let id = self.ack_id_for("NACK")?;
        self.client
            .request_within(Client::ack_frame(Command::Nack, id, None), timeout)
            .await
            .map(|_| ())
    }

    /// The ACK/NACK `id`, or a usage error for auto-acknowledged messages.
    pub(crate) fn ack_id_for(&self, what: &str) -> Result<&str> {
        self.ack_id.as_deref().ok_or_else(|| {
            Error::Usage(format!(
                "cannot {what} message {}: its subscription uses ack:auto",
                self.message_id
            ))
        })
    }

    /// The connection this message arrived on.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Whether `client` is the connection this message arrived on.
    pub(crate) fn same_connection(&self, client: &Client) -> bool {
        std::sync::Arc::ptr_eq(&self.client.inner, &client.inner)
    }
}
