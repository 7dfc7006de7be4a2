//! [`Transaction`]: sends and acknowledgements that take effect together.

use bytes::Bytes;
use fmq_proto::{Command, Frame};

use crate::client::{send_frame, Client};
use crate::error::{Error, Result};
use crate::subscription::Message;

/// A STOMP transaction started with [`Client::begin`].
///
/// Frames sent through it are held by the broker until
/// [`commit`](Self::commit); [`abort`](Self::abort) discards them.
/// Dropping an unfinished transaction aborts it (best effort).
#[derive(Debug)]
pub struct Transaction {
    /// The transaction id, as sent in BEGIN `transaction`.
    pub id: String,
    client: Client,
    open: bool,
}

impl Transaction {
    pub(crate) fn new(client: Client, id: String) -> Transaction {
        Transaction {
            id,
            client,
            open: true,
        }
    }

    /// Sends a message as part of the transaction; it is delivered only if
    /// the transaction commits.
    pub async fn send(
        &self,
        destination: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<()> {
        let mut frame = send_frame(destination, body.into(), headers);
        frame.headers.push("transaction", self.id.clone());
        self.client.write(frame).await
    }

    /// Acknowledges `message` as part of the transaction.
    pub async fn ack(&self, message: &Message) -> Result<()> {
        self.acknowledge(Command::Ack, message).await
    }

    /// Rejects `message` as part of the transaction.
    pub async fn nack(&self, message: &Message) -> Result<()> {
        self.acknowledge(Command::Nack, message).await
    }

    async fn acknowledge(&self, command: Command, message: &Message) -> Result<()> {
        if !message.same_connection(&self.client) {
            return Err(Error::Usage(format!(
                "message {} was received on another connection",
                message.message_id
            )));
        }
        let id = message.ack_id_for(command.as_str())?;
        self.client
            .write(Client::ack_frame(command, id, Some(&self.id)))
            .await
    }

    /// Commits the transaction and waits for the broker's RECEIPT, i.e.
    /// until its sends and acknowledgements are applied and stored.
    pub async fn commit(mut self) -> Result<()> {
        self.open = false;
        let frame = Frame::new(Command::Commit).header("transaction", self.id.clone());
        self.client.request(frame).await
    }

    /// Discards the transaction and waits for the broker's RECEIPT.
    pub async fn abort(mut self) -> Result<()> {
        self.open = false;
        let frame = Frame::new(Command::Abort).header("transaction", self.id.clone());
        self.client.request(frame).await
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.open {
            self.client
                .try_write(Frame::new(Command::Abort).header("transaction", self.id.clone()));
        }
    }
}
