//! Frames of [`crate::proto`] over QUIC streams, both sides.

use crate::proto::{Message, ProtoError, MAX_BLOCK_DATA};
use crate::{Error, Result};

fn link(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Link(format!("{what}: {e}"))
}

/// A failed write; a lost connection says why (the peer's reason: its
/// client revoked, too many connections, ...).
fn write_failed(what: &str, e: quinn::WriteError) -> Error {
    match e {
        quinn::WriteError::ConnectionLost(c) => link(what, format!("connection lost ({c})")),
        e => link(what, e),
    }
}

/// A failed read, as [`write_failed`].
fn read_failed(what: &str, e: quinn::ReadExactError) -> Error {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            link(what, format!("connection lost ({c})"))
        }
        e => link(what, e),
    }
}

/// Send one message.
pub async fn send(stream: &mut quinn::SendStream, message: &Message) -> Result<()> {
    // Handed over whole: no copy into the stream's buffers.
    stream
        .write_chunk(bytes::Bytes::from(message.encode()))
        .await
        .map_err(|e| write_failed("sending", e))
}

/// Send one message followed by raw bytes (a block's data), both handed
/// to the stream without a copy.
pub async fn send_with_data(
    stream: &mut quinn::SendStream,
    message: &Message,
    data: Vec<u8>,
) -> Result<()> {
    stream
        .write_all_chunks(&mut [
            bytes::Bytes::from(message.encode()),
            bytes::Bytes::from(data),
        ])
        .await
        .map_err(|e| write_failed("sending", e))
}

/// Receive one message; `None` when the peer finished the stream cleanly
/// between messages.
pub async fn recv(stream: &mut quinn::RecvStream) -> Result<Option<Message>> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_failed("receiving", e)),
    }
    let len = Message::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| read_failed("receiving", e))?;
    Ok(Some(Message::decode(&body)?))
}

/// Receive one message; the stream ending first is an error.
pub async fn expect(stream: &mut quinn::RecvStream) -> Result<Message> {
    recv(stream)
        .await?
        .ok_or_else(|| Error::Link("the peer ended the stream early".into()))
}

/// Receive the `len` raw bytes that follow a block header.
pub async fn recv_data(stream: &mut quinn::RecvStream, len: u32) -> Result<Vec<u8>> {
    if len > MAX_BLOCK_DATA {
        return Err(ProtoError::InvalidBlock("data too long").into());
    }
    let mut data = vec![0u8; len as usize];
    stream
        .read_exact(&mut data)
        .await
        .map_err(|e| read_failed("receiving block data", e))?;
    Ok(data)
}
