//! One request's protocol, once its stream is dispatched: the control
//! stream of an epoch ([`receive_epoch`]), its data streams
//! ([`receive_data`]) and a restore ([`serve_restore`]), with how a
//! request ends badly ([`Fault`]) and how it is refused ([`refuse`]).
//!
//! They are given the volume (or the epoch's staging) the dispatcher in
//! [`crate::serve`] found in the volume registry; they know nothing of
//! connections, hellos or clients.

use std::time::Duration;

use ublk_mirror_common::proto::{Message, ProtoError, Writer, MAX_RESEND, MAX_STAGED_RANGES};
use ublk_mirror_common::{block, wire};

use crate::error::Error;
use crate::snapshots::SnapshotInfo;
use crate::store::Staging;
use crate::volumes::SharedVolume;

/// Longest wait for the next message of an epoch in progress.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// How a request ended badly.
pub(crate) enum Fault {
    /// The peer broke the protocol: the connection ends.
    Protocol(String),
    /// Anything else: the stream ends.
    Other(Error),
}

impl From<ublk_mirror_common::Error> for Fault {
    fn from(e: ublk_mirror_common::Error) -> Fault {
        match e {
            ublk_mirror_common::Error::Proto(p) => Fault::Protocol(p.to_string()),
            ublk_mirror_common::Error::Link(reason) => Fault::Other(Error::Link(reason)),
            ublk_mirror_common::Error::Io { context, source } => {
                Fault::Other(Error::Io { context, source })
            }
            other => Fault::Other(Error::Invalid(other.to_string())),
        }
    }
}

impl From<Error> for Fault {
    fn from(e: Error) -> Fault {
        Fault::Other(e)
    }
}

pub(crate) async fn refuse(
    send: &mut quinn::SendStream,
    reason: String,
) -> std::result::Result<(), Fault> {
    wire::send(send, &Message::Refused { reason }).await?;
    let _ = send.finish();
    Ok(())
}

pub(crate) fn variant(m: &Message) -> String {
    format!("{m:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or("?")
        .to_string()
}

/// The control stream of one epoch: begin (or resume) its staging, tell
/// the client what is staged already, wait for `EndEpoch`, publish, and
/// answer `Committed`. Nothing is held while the data streams work: the
/// volume's lock only for beginning and publishing.
pub(crate) async fn receive_epoch(
    volume: &SharedVolume,
    epoch: u64,
    writer: Writer,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let begun = {
        let mut v = volume.lock().await;
        tokio::task::block_in_place(|| v.begin(epoch, writer))
    };
    let staging = match begun {
        Ok(s) => s,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    let ranges = staging.ranges();
    let mut chunks = ranges.chunks(MAX_STAGED_RANGES).peekable();
    if chunks.peek().is_none() {
        wire::send(
            send,
            &Message::Staged {
                ranges: Vec::new(),
                adopted: staging.adopted(),
                done: true,
            },
        )
        .await?;
    }
    while let Some(chunk) = chunks.next() {
        let done = chunks.peek().is_none();
        wire::send(
            send,
            &Message::Staged {
                ranges: chunk.to_vec(),
                adopted: staging.adopted(),
                done,
            },
        )
        .await?;
    }
    // The data streams may take long (a whole disk): a dead peer is found
    // by the connection's idle timeout, and its staging waits for it.
    match wire::expect(recv).await? {
        Message::EndEpoch => {}
        other => {
            return Err(Fault::Protocol(
                ProtoError::Malformed(format!("{} inside an epoch", variant(&other))).to_string(),
            ))
        }
    }
    let committed = {
        let mut v = volume.lock().await;
        tokio::task::block_in_place(|| v.commit(&staging))
    };
    match committed {
        Ok(()) => {
            wire::send(send, &Message::Committed { epoch }).await?;
            let _ = send.finish();
            Ok(())
        }
        Err(e) => {
            tracing::error!(epoch, "cannot publish: {e}");
            refuse(
                send,
                format!("the server cannot publish epoch {epoch}: {e}"),
            )
            .await
        }
    }
}

/// A restore's stream: `RestoreInfo`, then for each `Have` the blocks of
/// the snapshot whose digests differ from the target's, and `HaveDone`.
pub(crate) async fn serve_restore(
    volume: &SharedVolume,
    info: &SnapshotInfo,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let reader = volume.lock().await.reader();
    let size = reader.size();
    wire::send(
        send,
        &Message::RestoreInfo {
            size,
            snapshot: info.name.clone(),
            epoch: info.epoch,
            epoch_ms: info.epoch_ms,
        },
    )
    .await?;
    while let Some(next) = tokio::time::timeout(MESSAGE_TIMEOUT, wire::recv(recv))
        .await
        .map_err(|_| Fault::Other(Error::Link("restore: the client went quiet".into())))??
    {
        let Message::Have {
            offset,
            len,
            digests,
        } = next
        else {
            return Err(Fault::Protocol(format!(
                "{} inside a restore",
                variant(&next)
            )));
        };
        // Bounded memory: a batch is read whole.
        if u64::from(len) * digests.len() as u64 > 64 << 20 {
            return refuse(send, "restore: a batch of more than 64 MiB".into()).await;
        }
        if offset >= size || offset % u64::from(len) != 0 {
            return refuse(
                send,
                format!("restore: blocks at {offset} are not in the volume"),
            )
            .await;
        }
        let blocks: Vec<(u64, u32)> =
            block::run_of(offset, u64::from(len), digests.len(), size).collect();
        // Read through the snapshot reader: publishing goes on meanwhile
        // (it preserves old chunks in the snapshot before it overwrites
        // them); hash and compress after.
        let mut data = vec![0u8; blocks.iter().map(|&(_, l)| l as usize).sum()];
        let read = tokio::task::block_in_place(|| {
            let mut at = 0usize;
            for &(o, l) in &blocks {
                reader.read(info.id, &mut data[at..at + l as usize], o)?;
                at += l as usize;
            }
            Ok::<(), Error>(())
        });
        if let Err(e) = read {
            return refuse(send, format!("restore: {e}")).await;
        }
        let mut same = 0u64;
        let mut at = 0usize;
        for (i, &(o, l)) in blocks.iter().enumerate() {
            let bytes = &data[at..at + l as usize];
            at += l as usize;
            let mine = block::digest(bytes);
            if digests.get(i) == Some(&mine) {
                same += 1;
                continue;
            }
            // Hashed once: the digest compared is the one that travels.
            let (header, payload) =
                tokio::task::block_in_place(|| block::encode_hashed(o, bytes, mine, 3));
            wire::send_with_data(send, &header, &payload).await?;
        }
        wire::send(send, &Message::HaveDone { same }).await?;
    }
    let _ = send.finish();
    Ok(())
}

/// One data stream of an epoch: blocks until `EndData`, each verified and
/// staged (several streams at once, in parallel); answered with the
/// blocks that failed their checks.
pub(crate) async fn receive_data(
    staging: &Staging,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let epoch = staging.epoch();
    let mut received = 0u64;
    let mut refused: Vec<(u64, u32)> = Vec::new();
    loop {
        // A client that stops sending mid-epoch does not hold the stream.
        let next = tokio::time::timeout(MESSAGE_TIMEOUT, wire::expect(recv))
            .await
            .map_err(|_| {
                Fault::Other(Error::Link(format!(
                    "epoch {epoch}: nothing received for {MESSAGE_TIMEOUT:?}; dropping the stream"
                )))
            })??;
        match next {
            Message::Block {
                offset,
                len,
                sha256,
                encoding,
                data_len,
            } => {
                let data = wire::recv_data(recv, data_len).await?;
                received += 1;
                let added = tokio::task::block_in_place(|| {
                    staging.add(offset, len, &sha256, encoding, &data)
                });
                match added {
                    Ok(()) => {}
                    Err(Error::BadBlock(reason)) => {
                        tracing::warn!(
                            epoch,
                            offset,
                            "block refused, asking for it again: {reason}"
                        );
                        if refused.len() >= MAX_RESEND {
                            let reason = format!("epoch {epoch}: more than {MAX_RESEND} blocks failed their checks; is the link corrupting data?");
                            return refuse(send, reason).await;
                        }
                        refused.push((offset, len));
                    }
                    Err(e) => return refuse(send, e.to_string()).await,
                }
            }
            Message::EndData { blocks } => {
                if blocks != received {
                    return Err(Fault::Protocol(format!(
                        "epoch {epoch}: {blocks} blocks announced, {received} received"
                    )));
                }
                wire::send(send, &Message::Resend { blocks: refused }).await?;
                let _ = send.finish();
                return Ok(());
            }
            other => {
                return Err(Fault::Protocol(
                    ProtoError::Malformed(format!("{} inside an epoch's data", variant(&other)))
                        .to_string(),
                ))
            }
        }
    }
}
