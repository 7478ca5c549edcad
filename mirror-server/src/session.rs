//! One request's protocol, once its stream is dispatched: the control
//! stream of an epoch ([`receive_epoch`]), its data streams
//! ([`receive_data`]) and a restore ([`serve_restore`]), with how a
//! request ends badly ([`Fault`]) and how it is refused ([`refuse`]).
//!
//! They are given the volume (or the epoch's staging) the dispatcher in
//! [`crate::serve`] found in the volume registry; they know nothing of
//! connections, hellos or clients.

use std::time::Instant;

use std::collections::{HashMap, VecDeque};

use ublk_mirror_common::proto::{self, Digest, Encoding, Message, Version, Writer};
use ublk_mirror_common::session::receive::{
    DataAction, DataReceiver, Ending, EpochReceiver, StageOutcome, MESSAGE_TIMEOUT,
};
use ublk_mirror_common::session::restore::plan_have;
use ublk_mirror_common::session::unexpected;
use ublk_mirror_common::{block, wire};

use crate::error::Error;
use crate::metrics::{StreamTraffic, Traffic};
use crate::snapshots::SnapshotInfo;
use crate::store::{Staging, VersionSource};
use crate::volumes::{SharedVolume, Volumes};

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
            ublk_mirror_common::Error::Peer(p) => Fault::Protocol(p),
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

/// Receive the next message, or fail once `deadline` passes.
async fn next_before(
    recv: &mut quinn::RecvStream,
    deadline: Instant,
    quiet: impl FnOnce() -> Error,
) -> std::result::Result<Option<Message>, Fault> {
    match tokio::time::timeout_at(deadline.into(), wire::recv(recv)).await {
        Ok(m) => Ok(m?),
        Err(_) => Err(Fault::Other(quiet())),
    }
}

/// The control stream of one epoch, driving an [`EpochReceiver`]: begin
/// (or resume) its staging, tell the client what is staged already, wait
/// for `EndEpoch`, publish, and answer. Nothing is held while the data
/// streams work: the volume's lock only for beginning and publishing.
/// `published` is told the digests of a published epoch.
pub(crate) async fn receive_epoch(
    volume: &SharedVolume,
    published: impl FnOnce(Vec<Digest>),
    epoch: u64,
    writer: Writer,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let mut receiver = EpochReceiver::new(epoch);
    let begun = {
        let mut v = volume.lock().await;
        tokio::task::block_in_place(|| v.begin(epoch, writer))
    };
    let staging = match begun {
        Ok(s) => s,
        Err(e) => return refuse(send, e.to_string()).await,
    };
    for frame in receiver.staged(&staging.ranges(), staging.adopted()) {
        wire::send(send, &frame).await?;
    }
    // The data streams may take long (a whole disk): a dead peer is found
    // by the connection's idle timeout, and its staging waits for it.
    if receiver.on_control(&wire::expect(recv).await?)? == Ending::Round {
        let synced = {
            let v = volume.lock().await;
            tokio::task::block_in_place(|| v.sync_round(&staging))
        };
        let answer = match synced {
            Ok(()) => receiver.synced(),
            Err(e) => {
                tracing::error!(epoch, "cannot make a pre-copy round durable: {e}");
                receiver.publish_failed(&e.to_string())
            }
        };
        wire::send(send, &answer).await?;
        let _ = send.finish();
        return Ok(());
    }
    let committed = {
        let mut v = volume.lock().await;
        tokio::task::block_in_place(|| v.commit(&staging))
    };
    let answer = match committed {
        Ok(()) => {
            published(staging.staged_digests());
            let dir = volume.lock().await.dir().to_path_buf();
            if crate::faults::take_drop_committed(&dir) {
                tracing::warn!(epoch, "fault injected: the Committed answer is dropped");
                return Err(Fault::Other(Error::Link("fault injected".into())));
            }
            receiver.published()
        }
        Err(e) => {
            tracing::error!(epoch, "cannot publish: {e}");
            receiver.publish_failed(&e.to_string())
        }
    };
    wire::send(send, &answer).await?;
    let _ = send.finish();
    Ok(())
}

/// The QUIC stream reset code of a restore whose version the chunk store
/// cannot give now (out of reach): the client asks again later.
pub(crate) const RESET_STORE_UNAVAILABLE: u32 = 4;

/// A restore's stream: `RestoreInfo`, then for each `Have` the blocks of
/// the snapshot whose digests differ from the target's, and `HaveDone`.
pub(crate) async fn serve_restore(
    reader: &VersionSource,
    info: &SnapshotInfo,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
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
    let quiet = || Error::Link("restore: the client went quiet".into());
    while let Some(next) = next_before(recv, Instant::now() + MESSAGE_TIMEOUT, quiet).await? {
        let Message::Have {
            offset,
            len,
            digests,
        } = next
        else {
            return Err(unexpected(&next, "inside a restore").into());
        };
        let blocks = match plan_have(offset, len, digests.len(), size) {
            Ok(b) => b,
            Err(reason) => {
                tracing::warn!("restore refused: {reason}");
                return refuse(send, reason).await;
            }
        };
        // Each block read through the snapshot reader (publishing goes on
        // meanwhile: it preserves old chunks in the snapshot before it
        // overwrites them), compared, and sent before the next is read:
        // a stream holds one block, not its batch (up to 64 MiB), however
        // many streams a client opens.
        let mut same = 0u64;
        for (&(o, l), theirs) in blocks.iter().zip(&digests) {
            let (bytes, known) = match tokio::task::block_in_place(|| reader.read_block(o, l)) {
                Ok(d) => d,
                Err(e @ Error::Store(_)) => {
                    // Out of reach for now: the stream is reset, which the
                    // client takes for a lost link and asks again (it goes
                    // on where it was); a refusal would end its restore.
                    tracing::warn!("restore: {e}; the client is left to ask again");
                    let _ = send.reset(RESET_STORE_UNAVAILABLE.into());
                    return Err(Fault::Other(e));
                }
                Err(e) => {
                    tracing::error!("restore refused: {e}");
                    return refuse(send, format!("restore: {e}")).await;
                }
            };
            let mine = known.unwrap_or_else(|| block::digest(&bytes));
            if *theirs == mine {
                same += 1;
                continue;
            }
            // Hashed once: the digest compared is the one that travels.
            let (header, payload) =
                tokio::task::block_in_place(|| block::encode_owned(o, bytes, mine, 3));
            // A client that reads nothing does not hold the stream for good.
            tokio::time::timeout(
                MESSAGE_TIMEOUT,
                wire::send_with_data(send, &header, payload),
            )
            .await
            .map_err(|_| Error::Link("restore: the client reads nothing".into()))??;
        }
        wire::send(send, &Message::HaveDone { same }).await?;
    }
    let _ = send.finish();
    Ok(())
}

/// Chunks fetched from the store for a data stream's `Known` blocks, at
/// most [`PREFETCH`] (the oldest go first; a block whose chunk went is
/// fetched when it arrives).
#[derive(Default)]
struct Prefetched {
    chunks: HashMap<Digest, Vec<u8>>,
    order: VecDeque<Digest>,
}

/// Chunks a data stream holds fetched ahead (8 MiB of full blocks: two
/// batches of a client's questions, and more).
const PREFETCH: usize = 128;

impl Prefetched {
    fn put(&mut self, d: Digest, data: Vec<u8>) {
        if self.chunks.insert(d, data).is_none() {
            self.order.push_back(d);
        }
        while self.order.len() > PREFETCH {
            if let Some(old) = self.order.pop_front() {
                self.chunks.remove(&old);
            }
        }
    }

    fn take(&mut self, d: &Digest) -> Option<Vec<u8>> {
        let data = self.chunks.remove(d)?;
        self.order.retain(|o| o != d);
        Some(data)
    }
}

/// Who sends a data stream, and what answers its questions.
pub(crate) struct Sender<'a> {
    /// The enrolled client.
    pub client: &'a str,
    /// The protocol its stream speaks.
    pub version: Version,
    /// Answers `HaveChunks` from the client's own volumes.
    pub volumes: &'a Volumes,
    /// Counts what arrives.
    pub metrics: &'a crate::metrics::Metrics,
}

/// One data stream of an epoch, driving a [`DataReceiver`]: blocks until
/// `EndData`, each verified and staged (several streams at once, in
/// parallel); answered with the blocks that failed their checks. In V3,
/// questions about chunks are answered as they come, and a `Known`
/// block's bytes are taken from the store (fetched when it was asked
/// about), checked like any others, or, for a block the store lacks but
/// this epoch staged already, from that copy's frame
/// ([`Staging::add_again`]).
pub(crate) async fn receive_data(
    staging: &Staging,
    from: Sender<'_>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<(), Fault> {
    let mut receiver = DataReceiver::new(staging.epoch(), from.version, Instant::now());
    let mut prefetched = Prefetched::default();
    let mut counted = StreamTraffic::new(from.metrics, from.client);
    loop {
        // A client that stops sending mid-epoch does not hold the stream.
        let quiet = || Error::Link(receiver.timed_out().to_string());
        let next = next_before(recv, receiver.deadline(), quiet)
            .await?
            .ok_or_else(|| Fault::Other(Error::Link("the peer ended the stream early".into())))?;
        match receiver.on_message(next, Instant::now())? {
            DataAction::Query(digests) => {
                let known = tokio::task::block_in_place(|| {
                    let mut known = from.volumes.known(from.client, &digests);
                    let wanted: Vec<Digest> = digests
                        .iter()
                        .zip(&known)
                        .filter(|(_, &k)| k)
                        .map(|(d, _)| *d)
                        .take(PREFETCH)
                        .collect();
                    for (d, data) in wanted
                        .iter()
                        .zip(from.volumes.fetch_chunks(from.client, &wanted))
                    {
                        if let Some(data) = data {
                            prefetched.put(*d, data);
                        }
                    }
                    // What the store lacks, this epoch may have staged
                    // already: sent once, staged again from its frame.
                    for (k, d) in known.iter_mut().zip(&digests) {
                        *k = *k || staging.holds(d);
                    }
                    known
                });
                let bits = proto::pack_bits(&known);
                wire::send(send, &Message::KnownChunks { bits }).await?;
            }
            DataAction::Stage {
                offset,
                len,
                sha256,
                encoding,
                data_len,
            } => {
                let mut traffic = Traffic {
                    blocks: 1,
                    wire_bytes: u64::from(data_len),
                    ..Traffic::default()
                };
                let added = if encoding == Encoding::Known {
                    traffic.known_bytes = u64::from(len);
                    tokio::task::block_in_place(|| {
                        let data = match prefetched.take(&sha256) {
                            Some(d) => Some(d),
                            None if staging.holds(&sha256) => {
                                return staging.add_again(offset, len, &sha256);
                            }
                            None => from
                                .volumes
                                .known_chunks(from.client, &[sha256])
                                .pop()
                                .flatten(),
                        };
                        match data {
                            Some(data) => staging.add(offset, len, &sha256, Encoding::Raw, &data),
                            None => Err(Error::BadBlock(
                                "sent as Known, but this server cannot give that chunk for this client now: send its bytes".into(),
                            )),
                        }
                    })
                } else {
                    // Its bytes within the stream's deadline too.
                    let data = tokio::time::timeout_at(
                        receiver.deadline().into(),
                        wire::recv_data(recv, data_len),
                    )
                    .await
                    .map_err(|_| Error::Link(receiver.timed_out().to_string()))??;
                    tokio::task::block_in_place(|| {
                        staging.add(offset, len, &sha256, encoding, &data)
                    })
                };
                let outcome = match added {
                    Ok(()) => StageOutcome::Staged,
                    Err(Error::BadBlock(reason)) => {
                        // A Known block the store could not give is no mismatch.
                        let mismatch = u64::from(encoding != Encoding::Known);
                        (traffic.blocks, traffic.known_bytes, traffic.mismatches) =
                            (0, 0, mismatch);
                        StageOutcome::Damaged(reason)
                    }
                    Err(e) => StageOutcome::Failed(e.to_string()),
                };
                counted.add(traffic);
                if let Some(reason) = receiver.on_staged(offset, len, outcome) {
                    // The server's own trouble (a full disk) or a link
                    // that corrupts: the operator hears of it here.
                    tracing::warn!(
                        client = from.client,
                        epoch = staging.epoch(),
                        "a data stream refused: {reason}"
                    );
                    return refuse(send, reason).await;
                }
            }
            DataAction::Answer(answer) => {
                // Counted before the client hears the stream is done.
                counted.flush();
                wire::send(send, &answer).await?;
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}
