//! A real `mirror-server` process on 127.0.0.1 and clients speaking to it
//! through the client library: enrollment, volumes, epochs, and the
//! peers it must refuse.

mod common;
use common::noise;
use common::prom::value as sample;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use ublk_mirror_common::block::encode as encode_block;
use ublk_mirror_common::client::Link;
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::proto::{Encoding, Message, Version, Writer};
use ublk_mirror_common::session::restore::ReadStep;
use ublk_mirror_common::token::Token;
use ublk_mirror_common::wire;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirror-server")
}

struct Server {
    data: PathBuf,
    child: Child,
    address: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        if !data.join("server.toml").exists() {
            let init = Command::new(bin())
                .args(["--data"])
                .arg(data)
                .args(["init", "--listen", "127.0.0.1:0"])
                .output()
                .unwrap();
            assert!(init.status.success(), "{init:?}");
            if std::env::var("MIRROR_TEST_STORE").as_deref() == Ok("s3") {
                on_seaweed(data);
            }
        }
        let mut child = Command::new(bin())
            .arg("--data")
            .arg(data)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server {
            data: data.to_path_buf(),
            child,
            address,
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap()
    }

    fn token(&self, name: &str) -> Token {
        let out = self.cli(&["client", "add", name, "--address", &self.address]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn image(&self, client: &str, volume: &str) -> Vec<u8> {
        std::fs::read(
            self.data
                .join("volumes")
                .join(client)
                .join(volume)
                .join("image"),
        )
        .unwrap()
    }
}

thread_local! {
    /// The SeaweedFS of each data directory of this test (`MIRROR_TEST_STORE=s3`):
    /// alive across restarts of its server, stopped when the test ends.
    static WEEDS: std::cell::RefCell<Vec<common::seaweed::Seaweed>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Point the server of `data` at a bucket of a SeaweedFS of its own
/// instead of the store directory `init` chose: the server tests run on
/// both backends (scripts/test runs them with MIRROR_TEST_STORE=s3 too).
fn on_seaweed(data: &Path) {
    let weed = common::seaweed::Seaweed::start();
    use_seaweed(data, &weed);
    WEEDS.with(|w| w.borrow_mut().push(weed));
}

/// Point the server of `data` (made by `init`) at a bucket of `weed`.
fn use_seaweed(data: &Path, weed: &common::seaweed::Seaweed) {
    let cred = data.join("s3.credentials");
    std::fs::write(
        &cred,
        format!(
            "aws_access_key_id = {}\naws_secret_access_key = {}\n",
            weed.key_id, weed.secret
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cred, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = data.join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("url = \"store\"\n"), "{text}");
    let text = text.replace(
        "url = \"store\"\n",
        &format!(
            "url = \"s3://{}/server\"\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n",
            weed.bucket,
            weed.endpoint,
            cred.display()
        ),
    );
    std::fs::write(&config, text).unwrap();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn enrolled(server: &Server, dir: &Path, name: &str) -> (Identity, Link) {
    let id = Identity::create(&dir.join(name)).unwrap();
    let token = server.token(name);
    let link = Link::connect(&id, token.server, &server.address)
        .await
        .unwrap();
    assert_eq!(link.enroll(name, token.secret).await.unwrap(), name);
    (id, link)
}

/// The writer of these tests' epochs: one device, its epoch `epoch`.
fn w(epoch: u64) -> Writer {
    Writer {
        device: [7; 16],
        epoch,
    }
}

/// The server's certificate fingerprint, from its identity.
fn token_fp(data: &Path) -> ublk_mirror_common::identity::Fingerprint {
    Identity::load(&data.join("identity"))
        .unwrap()
        .fingerprint()
}

/// Reads blocks of `data`.
fn reader(
    data: Vec<u8>,
) -> impl Fn(u64, u32) -> ublk_mirror_common::Result<Vec<u8>> + Send + Sync + 'static {
    move |o, l| Ok(data[o as usize..][..l as usize].to_vec())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolled_clients_ship_epochs_into_their_own_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_a, a) = enrolled(&server, dir.path(), "laptop").await;
    let (_b, b) = enrolled(&server, dir.path(), "desktop").await;
    let size = 1 << 20;
    assert_eq!(
        a.open_volume("root", size).await.unwrap().published_epoch,
        0
    );
    assert_eq!(
        b.open_volume("root", size).await.unwrap().published_epoch,
        0
    );

    let mut model = vec![0u8; size as usize];
    let blocks = [(0u64, 65536u32), (196608, 4096), (512 * 1024, 131072)];
    for &(o, l) in &blocks {
        model[o as usize..][..l as usize].copy_from_slice(&pattern(o as u8, l as usize));
    }
    let shipped = a
        .send_epoch("root", 1, w(1), &blocks, 3, reader(model.clone()))
        .await
        .unwrap();
    assert_eq!(shipped.blocks, 3);
    assert!(
        shipped.wire_bytes < shipped.bytes,
        "nothing was compressed: {shipped:?}"
    );
    assert!(server.image("laptop", "root") == model);
    // The server answers the image's hashes (what a resync compares).
    let hashes = a.hashes("root", &blocks).await.unwrap();
    for (&(o, l), h) in blocks.iter().zip(&hashes) {
        let want: [u8; 32] = Sha256::digest(&model[o as usize..][..l as usize]).into();
        assert_eq!(*h, want, "hash of the block at {o}");
    }
    // The other client's volume of the same name is its own.
    assert!(server.image("desktop", "root").iter().all(|&x| x == 0));
    assert_eq!(
        b.open_volume("root", size).await.unwrap().published_epoch,
        0
    );

    // Epoch 2: a zero block becomes a hole; an old epoch number is refused.
    model[0..65536].fill(0);
    a.send_epoch("root", 2, w(2), &[(0, 65536)], 3, reader(model.clone()))
        .await
        .unwrap();
    assert!(server.image("laptop", "root") == model);
    let err = a
        .send_epoch("root", 2, w(3), &[(0, 4096)], 3, |_, l| {
            Ok(vec![1; l as usize])
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not newer than the published epoch 2"),
        "{err}"
    );
    // A size that differs from the volume's is refused.
    let err = a
        .open_volume("root", size * 2)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("size never changes"), "{err}");

    let listed = server.cli(&["volumes", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v[1]["volume"], "laptop/root");
    assert_eq!(v[1]["published_epoch"], 2);
    assert_eq!(v[0]["volume"], "desktop/root");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_block_is_refused_and_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("v", 1 << 20).await.unwrap();
    let data = pattern(9, 8192);
    let (mut control, mut answers) = begin(&link, "v", 1, w(1)).await;
    assert_eq!(
        wire::expect(&mut answers).await.unwrap(),
        Message::Staged {
            ranges: vec![],
            adopted: false,
            done: true
        }
    );
    // Damaged in transit: the bytes no longer match their hash.
    let mut damaged = data.clone();
    damaged[100] ^= 1;
    let header = Message::Block {
        offset: 0,
        len: 8192,
        sha256: Sha256::digest(&data).into(),
        encoding: Encoding::Raw,
        data_len: 8192,
    };
    assert_eq!(
        data_stream(&link, "v", 1, &[(header, damaged)]).await,
        Message::Resend {
            blocks: vec![(0, 8192)]
        }
    );
    // Publishing without sending it again is refused.
    wire::send(&mut control, &Message::EndEpoch).await.unwrap();
    let Message::Refused { reason } = wire::expect(&mut answers).await.unwrap() else {
        panic!("an epoch with a refused block was published");
    };
    assert!(reason.contains("failed their checks"), "{reason}");
    assert!(
        server.image("laptop", "v").iter().all(|&x| x == 0),
        "a refused block reached the image"
    );
    // Begun again, sent again (on another stream), published.
    let (mut control, mut answers) = begin(&link, "v", 1, w(1)).await;
    assert!(matches!(
        wire::expect(&mut answers).await.unwrap(),
        Message::Staged { done: true, .. }
    ));
    let (header, payload) = encode_block(0, &data, 3);
    assert_eq!(
        data_stream(&link, "v", 1, &[(header, payload)]).await,
        Message::Resend { blocks: vec![] }
    );
    wire::send(&mut control, &Message::EndEpoch).await.unwrap();
    assert_eq!(
        wire::expect(&mut answers).await.unwrap(),
        Message::Committed { epoch: 1 }
    );
    assert_eq!(server.image("laptop", "v")[..8192], data[..]);
}

/// A control stream with `BeginEpoch` sent.
async fn begin(
    link: &Link,
    volume: &str,
    epoch: u64,
    writer: Writer,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = link.stream().await.unwrap();
    wire::send(
        &mut send,
        &Message::BeginEpoch {
            volume: volume.into(),
            epoch,
            writer,
        },
    )
    .await
    .unwrap();
    (send, recv)
}

/// Send `blocks` on a data stream of the epoch; the server's answer.
async fn data_stream(
    link: &Link,
    volume: &str,
    epoch: u64,
    blocks: &[(Message, Vec<u8>)],
) -> Message {
    let (mut send, mut recv) = link.stream().await.unwrap();
    wire::send(
        &mut send,
        &Message::EpochData {
            volume: volume.into(),
            epoch,
        },
    )
    .await
    .unwrap();
    for (header, data) in blocks {
        wire::send_with_data(&mut send, header, data.to_vec())
            .await
            .unwrap();
    }
    wire::send(
        &mut send,
        &Message::EndData {
            blocks: blocks.len() as u64,
        },
    )
    .await
    .unwrap();
    wire::expect(&mut recv).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_epoch_resumes_without_resending_what_the_server_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = Server::start(&data_dir);
    let (id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 8 << 20;
    link.open_volume("v", size).await.unwrap();
    let blocks: Vec<(u64, u32)> = (0..64).map(|i| (i * 65536, 65536)).collect();
    // The reading side fails half-way (a disk error, the process stopped):
    // what arrived stays staged.
    let failing = |data: Vec<u8>| {
        move |o: u64, l: u32| {
            if o >= 2 << 20 {
                return Err(ublk_mirror_common::Error::io(
                    "reading",
                    std::io::Error::other("stopped"),
                ));
            }
            Ok(data[o as usize..][..l as usize].to_vec())
        }
    };
    let one = noise(7, 4 << 20);
    assert!(link
        .send_epoch("v", 1, w(1), &blocks, 1, failing(one.clone()))
        .await
        .is_err());
    let shipped = link
        .send_epoch("v", 1, w(1), &blocks, 1, reader(one.clone()))
        .await
        .unwrap();
    // How much was staged before the failure stopped the four streams
    // depends on scheduling; that it all counts does not.
    assert!(shipped.resumed_bytes > 0, "{shipped:?}");
    assert_eq!(shipped.bytes + shipped.resumed_bytes, 4 << 20);
    assert!(server.image("laptop", "v")[..4 << 20] == one[..]);

    // The same across a server killed and restarted: the staged blocks
    // are checked and kept.
    let two = noise(8, 4 << 20);
    assert!(link
        .send_epoch("v", 2, w(2), &blocks, 1, failing(two.clone()))
        .await
        .is_err());
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    server = Server::start(&data_dir);
    let link = Link::connect(&id, token_fp(&data_dir), &server.address)
        .await
        .unwrap();
    let shipped = link
        .send_epoch("v", 2, w(2), &blocks, 1, reader(two.clone()))
        .await
        .unwrap();
    assert!(shipped.resumed_bytes > 0, "{shipped:?}");
    assert_eq!(shipped.bytes + shipped.resumed_bytes, 4 << 20);
    assert!(server.image("laptop", "v")[..4 << 20] == two[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_reused_tokens_wrong_fingerprints_and_revoked_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let token = server.token("laptop");

    // A certificate that never enrolled may only enroll.
    let stranger = Identity::create(&dir.path().join("stranger")).unwrap();
    let link = Link::connect(&stranger, token.server, &server.address)
        .await
        .unwrap();
    let err = link
        .open_volume("root", 4096)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not enrolled"), "{err}");
    let err = link
        .enroll("laptop", [0; 32])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused"), "{err}");

    // The token works once.
    let mine = Identity::create(&dir.path().join("mine")).unwrap();
    let link = Link::connect(&mine, token.server, &server.address)
        .await
        .unwrap();
    link.enroll("laptop", token.secret).await.unwrap();
    let again = Link::connect(&stranger, token.server, &server.address)
        .await
        .unwrap();
    assert!(
        again.enroll("laptop", token.secret).await.is_err(),
        "a token was used twice"
    );

    // A client that pinned another server does not connect.
    let impostor = Identity::create(&dir.path().join("impostor")).unwrap();
    let err = Link::connect(&mine, impostor.fingerprint(), &server.address)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not the server this machine enrolled with"),
        "{err}"
    );
    assert_eq!(err.kind(), ublk_mirror_common::ErrorKind::Refused, "{err}");

    // Revocation closes the live connection and refuses new ones.
    link.open_volume("root", 4096).await.unwrap();
    let out = server.cli(&["client", "revoke", "laptop"]);
    assert!(out.status.success(), "{out:?}");
    let mut closed = false;
    for _ in 0..50 {
        if link.close_reason().is_some() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "a revoked client's connection stayed open");
    let link = Link::connect(&mine, token.server, &server.address)
        .await
        .unwrap();
    let err = link
        .open_volume("root", 4096)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("enrollment was revoked"), "{err}");
    let listed = String::from_utf8_lossy(&server.cli(&["client", "list"]).stdout).to_string();
    assert!(listed.contains("revoked"), "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_frame_ends_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_a, bad) = enrolled(&server, dir.path(), "bad").await;
    let (_b, good) = enrolled(&server, dir.path(), "good").await;
    good.open_volume("v", 1 << 20).await.unwrap();
    let (mut send, _recv) = bad.stream().await.unwrap();
    // A frame announcing more than the limit.
    send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    // (The server may have closed the connection already.)
    let _ = send.write_all(&[0; 64]).await;
    let mut closed = false;
    for _ in 0..50 {
        if let Some(reason) = bad.close_reason() {
            assert!(reason.contains("larger than the limit"), "{reason}");
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the connection that sent garbage stayed open");
    let data = pattern(1, 4096);
    good.send_epoch("v", 1, w(1), &[(0, 4096)], 3, move |_, _| Ok(data.clone()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_during_commits_always_holds_a_published_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data);
    let (id, _enrolled) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 8 << 20;
    // The device as of every epoch ever attempted: the server may have
    // published one whose answer was lost.
    let mut models: std::collections::BTreeMap<u64, Vec<u8>> =
        [(0, vec![0u8; size as usize])].into();
    let mut seed = 1u64;
    let mut attempt = 0u64;
    for round in 0..5u64 {
        let link = Link::connect(&id, token_fp(&data), &server.address)
            .await
            .unwrap();
        let info = link.open_volume("root", size).await.unwrap();
        // Before anything is sent: the image is exactly the published epoch.
        let image = server.image("laptop", "root");
        assert!(
            image == models[&info.published_epoch],
            "round {round}: the image is not published epoch {}",
            info.published_epoch
        );
        // And the chunk store's newest version is that epoch, whole.
        if info.published_epoch > 0 {
            let store = store_json(&data);
            assert_eq!(
                store["volumes"][0]["epoch"], info.published_epoch,
                "round {round}: {store}"
            );
        }
        let mut base = models[&info.published_epoch].clone();
        let mut published = info.published_epoch;
        let shipping = async {
            loop {
                let epoch = published + 1;
                let mut next = base.clone();
                let mut blocks = Vec::new();
                for _ in 0..24 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let at = (seed >> 33) % (size / 65536) * 65536;
                    blocks.push((at, 65536u32));
                    let fill: Vec<u8> = (0..65536u64).map(|i| (seed >> (i % 57)) as u8).collect();
                    next[at as usize..][..65536].copy_from_slice(&fill);
                }
                blocks.sort_unstable();
                blocks.dedup();
                models.insert(epoch, next.clone());
                // Every attempt is another epoch of the device (a device
                // never gives one epoch number two contents).
                attempt += 1;
                let sent = link
                    .send_epoch("root", epoch, w(attempt), &blocks, 1, reader(next.clone()))
                    .await;
                if sent.is_err() {
                    return;
                }
                published = epoch;
                base = next;
            }
        };
        let kill_after = Duration::from_millis(150 + 97 * round);
        tokio::select! {
            () = shipping => panic!("shipping ended before the kill"),
            () = tokio::time::sleep(kill_after) => {}
        }
        // kill -9 in the middle of whatever it was doing.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        server = Server::start(&data);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_device_takes_over_its_earlier_epoch_s_staging() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 8 << 20;
    link.open_volume("v", size).await.unwrap();
    let mut before = vec![0u8; size as usize];
    before[..4 << 20].copy_from_slice(&noise(11, 4 << 20));
    before[6 << 20..][..65536].copy_from_slice(&noise(12, 65536));
    // Epoch 7 of the device: the block at 6 MiB goes first, then the
    // first 4 MiB, until the daemon dies at 1 MiB.
    let mut first: Vec<(u64, u32)> = vec![(6 << 20, 65536)];
    first.extend((0..64).map(|i| (i * 65536, 65536u32)));
    let dying = {
        let data = before.clone();
        move |o: u64, l: u32| {
            if o == 1 << 20 {
                return Err(ublk_mirror_common::Error::io(
                    "reading",
                    std::io::Error::other("killed"),
                ));
            }
            Ok(data[o as usize..][..l as usize].to_vec())
        }
    };
    assert!(link
        .send_epoch("v", 1, w(7), &first, 1, dying)
        .await
        .is_err());
    // It comes back as epoch 9 (an unclean stop: everything is resync),
    // with two blocks changed meanwhile and the one at 6 MiB rewritten;
    // its list has only the first 4 MiB.
    let mut after = before.clone();
    after[3 * 65536..][..65536].copy_from_slice(&noise(13, 65536));
    after[10 * 65536..][..65536].fill(0);
    after[6 << 20..][..65536].copy_from_slice(&noise(14, 65536));
    let second: Vec<(u64, u32)> = (0..64).map(|i| (i * 65536, 65536u32)).collect();
    let shipped = link
        .send_epoch("v", 1, w(9), &second, 1, reader(after.clone()))
        .await
        .unwrap();
    // What was staged and is still so did not travel again.
    assert!(shipped.resumed_bytes >= 4 * 65536, "{shipped:?}");
    let image = server.image("laptop", "v");
    let wrong: Vec<usize> = (0..size as usize / 65536)
        .filter(|&b| image[b * 65536..][..65536] != after[b * 65536..][..65536])
        .collect();
    assert!(
        wrong.is_empty(),
        "the published image is not epoch 9: blocks {wrong:?} differ ({shipped:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_cannot_go_past_the_server_s_limits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    drop(server);
    let config = data.join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace("max_volumes_per_client = 64", "max_volumes_per_client = 2")
        .replace(
            "# max_bytes_per_client = \"4TiB\"",
            "max_bytes_per_client = \"3M\"",
        );
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&data);
    let (_a, a) = enrolled(&server, dir.path(), "laptop").await;
    let (_b, b) = enrolled(&server, dir.path(), "desktop").await;
    a.open_volume("one", 1 << 20).await.unwrap();
    let err = a.open_volume("big", 4 << 20).await.unwrap_err().to_string();
    assert!(err.contains("past its 3MiB"), "{err}");
    a.open_volume("two", 1 << 20).await.unwrap();
    let err = a
        .open_volume("three", 1 << 20)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("has 2 volumes"), "{err}");
    // Opening one it has is no new volume; another client has its own limits.
    a.open_volume("one", 1 << 20).await.unwrap();
    b.open_volume("one", 2 << 20).await.unwrap();
    // At most 128 connections per client at once (each may hold buffers).
    let (a_id, token) = (_a, server.token("spare"));
    let mut more = Vec::new();
    for _ in 0..127 {
        let link = Link::connect(&a_id, token.server, &server.address)
            .await
            .unwrap();
        link.open_volume("one", 1 << 20).await.unwrap();
        more.push(link);
    }
    let extra = Link::connect(&a_id, token.server, &server.address).await;
    let err = match extra {
        Ok(link) => link.open_volume("one", 1 << 20).await.unwrap_err(),
        Err(e) => e,
    }
    .to_string();
    assert!(err.contains("too many connections"), "{err}");
    b.open_volume("one", 2 << 20).await.unwrap();
    drop(more.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let link = Link::connect(&a_id, token.server, &server.address)
            .await
            .unwrap();
        match link.open_volume("one", 1 << 20).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_are_taken_listed_and_deleted_with_the_server_running_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 4 << 20;
    link.open_volume("v", size).await.unwrap();
    let blocks: Vec<(u64, u32)> = (0..16).map(|i| (i * 65536, 65536)).collect();
    let one = noise(1, 1 << 20);
    link.send_epoch("v", 1, w(1), &blocks, 1, reader(one.clone()))
        .await
        .unwrap();
    // From the client, over QUIC.
    let (name, epoch, _) = link.snapshot("v", Some("first")).await.unwrap();
    assert_eq!((name.as_str(), epoch), ("first", 1));
    let err = link
        .snapshot("v", Some("first"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already"), "{err}");
    let two = noise(2, 1 << 20);
    link.send_epoch("v", 2, w(2), &blocks[..8], 1, reader(two.clone()))
        .await
        .unwrap();
    // From the command line, through the running server's admin socket.
    let out = server.cli(&["snapshot", "laptop/v"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("epoch 2"),
        "{out:?}"
    );
    let listed = server.cli(&["snapshots", "laptop/v", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list[0]["name"], "first");
    assert_eq!(list[0]["kind"], "manual");
    // Epoch 2 overwrote 512 KiB of what "first" shows: that much is kept.
    assert_eq!(list[0]["bytes"], 512 * 1024);
    assert_eq!(list[1]["epoch"], 2);
    let out = server.cli(&["delete", "laptop/v@nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot nope"));
    let out = server.cli(&["delete", "laptop/x@first"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no volume laptop/x"),
        "{out:?}"
    );
    // With no server running, the command does it itself.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let out = server.cli(&["snapshot", "laptop/v", "offline"]);
    assert!(out.status.success(), "{out:?}");
    let second = list[1]["name"].as_str().unwrap().to_string();
    let out = server.cli(&["delete", &format!("laptop/v@{second}")]);
    assert!(out.status.success(), "{out:?}");
    // Done here as the server does: the snapshot taken pins its version
    // in the chunk store (else GC takes it), the one deleted no longer.
    let config = mirror_server::config::ServerConfig::load(&data.join("server.toml")).unwrap();
    let pins = config.chunk_store(&data).unwrap().pins("laptop/v").unwrap();
    assert!(pins.contains_key("offline"), "{pins:?}");
    assert!(!pins.contains_key(&second), "{pins:?}");
    // "first" still reads as epoch 1, through what "second" handed it.
    let vdir = data.join("volumes/laptop/v");
    let (v, _) = mirror_server::store::Volume::open(&vdir).unwrap();
    let first = v.snapshots().get("first").unwrap().id;
    let mut seen = vec![0u8; 1 << 20];
    v.read_snapshot(first, &mut seen, 0).unwrap();
    assert!(seen == one, "snapshot first is not epoch 1");
    drop(v);
    server = Server::start(&data);
    let link = Link::connect(&_id, token_fp(&data), &server.address)
        .await
        .unwrap();
    let (_, epoch, _) = link.snapshot("v", None).await.unwrap();
    assert_eq!(epoch, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schedule_takes_snapshots_only_when_something_changed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(Server::start(&data));
    let config = data.join("server.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("every = \"1h\"", "every = \"1s\"");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("v", 1 << 20).await.unwrap();
    let count = || {
        let out = server.cli(&["snapshots", "laptop/v", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    // Nothing published: nothing to keep.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count(), 0);
    link.send_epoch("v", 1, w(1), &[(0, 65536)], 1, reader(noise(3, 65536)))
        .await
        .unwrap();
    let mut waited = 0;
    while count() == 0 {
        waited += 1;
        assert!(waited < 100, "no scheduled snapshot after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The volume does not change: no more snapshots.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count(), 1);
    let out = server.cli(&["snapshots", "laptop/v", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["kind"], "scheduled");
    assert_eq!(list[0]["epoch"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bandwidth_limit_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_id, mut link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("v", 8 << 20).await.unwrap();
    link.set_bandwidth(Some(1 << 20));
    // 2 MiB that do not compress, at 1 MiB/s: at least about 2 s (a slow
    // machine only makes it longer, so this bound cannot flake).
    let data = noise(88172645463325252, 2 << 20);
    let blocks: Vec<(u64, u32)> = (0..32).map(|i| (i * 65536, 65536)).collect();
    let started = std::time::Instant::now();
    link.send_epoch("v", 1, w(1), &blocks, 1, reader(data.clone()))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "2 MiB at 1 MiB/s took only {took:?}"
    );
    assert!(server.image("laptop", "v")[..2 << 20] == data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_changes_address_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("v", 1 << 20).await.unwrap();
    let data = pattern(3, 65536);
    link.send_epoch("v", 1, w(1), &[(0, 65536)], 3, {
        let data = data.clone();
        move |_, _| Ok(data.clone())
    })
    .await
    .unwrap();
    // A new network: another local address (port), same connection.
    let before = link.local_addr().unwrap();
    link.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    assert_ne!(link.local_addr().unwrap(), before);
    let more = pattern(4, 65536);
    link.send_epoch("v", 2, w(2), &[(65536, 65536)], 3, {
        let more = more.clone();
        move |_, _| Ok(more.clone())
    })
    .await
    .unwrap();
    assert!(
        link.close_reason().is_none(),
        "the connection did not survive the move"
    );
    assert_eq!(server.image("laptop", "v")[65536..131072], more[..]);
}

/// A small tmpfs, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(at.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_server_disk_is_a_clean_error_and_the_client_resumes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a small file system needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(fs) = SmallFs::mount(&data, "4M") else {
        panic!("cannot mount a tmpfs as root");
    };
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("v", 48 << 20).await.unwrap();
    // Far more than QUIC lets the client have in flight: it is still
    // sending (and its answers to questions about chunks wait unread
    // before the refusal) when the server stops the stream; the reason
    // reaches it all the same.
    let data = noise(0x2545_f491_4f6c_dd1d, 32 << 20);
    let blocks: Vec<(u64, u32)> = (0..512).map(|i| (i * 65536, 65536)).collect();
    let err = link
        .send_epoch("v", 1, w(1), &blocks, 1, reader(data.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("No space left"), "{err}");
    // The server is fine; with space back, the same epoch goes through,
    // without what was staged before the disk filled.
    fs.resize("128M");
    let shipped = link
        .send_epoch("v", 1, w(1), &blocks, 1, reader(data.clone()))
        .await
        .unwrap();
    assert!(shipped.resumed_bytes > 0, "{shipped:?}");
    assert_eq!(shipped.bytes + shipped.resumed_bytes, 32 << 20);
    assert!(server.image("laptop", "v")[..32 << 20] == data[..]);
    drop(server);
}

/// `mirror-server ARGS` on data directory `data` (a server running on it
/// or not).
fn cli_at(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

/// `mirror-server store --json` of a server's data directory.
fn store_json(data: &Path) -> serde_json::Value {
    let out = cli_at(data, &["store", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chunk_store_keeps_every_epoch_deduplicated_and_rebuilds_lost_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (a_id, a) = enrolled(&server, dir.path(), "laptop").await;
    let (_b_id, b) = enrolled(&server, dir.path(), "desktop").await;
    let size: u64 = 4 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();
    a.open_volume("root", size).await.unwrap();
    b.open_volume("root", size).await.unwrap();
    let mut model = noise(1, size as usize);
    // A hole stays a hole: never stored.
    model[65536..131072].fill(0);
    a.send_epoch("root", 1, w(1), &all, 3, reader(model.clone()))
        .await
        .unwrap();
    let first = store_json(&data);
    let s3 = std::env::var("MIRROR_TEST_STORE").as_deref() == Ok("s3");
    assert_eq!(
        first["store"].as_str().unwrap().starts_with("s3://"),
        s3,
        "{first}"
    );
    assert_eq!(first["chunks"], 63, "{first}");
    assert_eq!(first["volumes"][0]["volume"], "laptop/root");
    assert_eq!(first["volumes"][0]["versions"], 1);

    // The desktop mirrors a clone of the laptop's disk with one block of
    // its own: the store takes one chunk more.
    let mut clone = model.clone();
    clone[..65536].copy_from_slice(&noise(2, 65536));
    let desktop = Writer {
        device: [8; 16],
        epoch: 1,
    };
    b.send_epoch("root", 1, desktop, &all, 3, reader(clone.clone()))
        .await
        .unwrap();
    let second = store_json(&data);
    assert_eq!(second["chunks"], 64, "{second}");
    let added = second["stored_bytes"].as_u64().unwrap() - first["stored_bytes"].as_u64().unwrap();
    assert!(added <= 65536 + 1024, "a clone cost {added} bytes");

    // Epoch 2 of the laptop: a version of its own.
    model[3 * 65536..4 * 65536].copy_from_slice(&noise(3, 65536));
    a.send_epoch(
        "root",
        2,
        w(2),
        &[(3 * 65536, 65536)],
        3,
        reader(model.clone()),
    )
    .await
    .unwrap();
    let third = store_json(&data);
    let laptop = &third["volumes"][1];
    assert_eq!(
        (laptop["volume"].as_str(), laptop["versions"].as_u64()),
        (Some("laptop/root"), Some(2))
    );
    assert_eq!(third["chunks"], 65);

    // The laptop's image is lost with the server's cache: the server
    // rebuilds it from the store, and the next epoch lands on it.
    drop(a);
    drop(b);
    drop(server);
    let cache = data.join("volumes/laptop/root");
    std::fs::remove_dir_all(&cache).unwrap();
    let server = Server::start(&data);
    let a = Link::connect(&a_id, token_fp(&data), &server.address)
        .await
        .unwrap();
    assert_eq!(
        a.open_volume("root", size).await.unwrap().published_epoch,
        2
    );
    assert!(
        server.image("laptop", "root") == model,
        "the image was not rebuilt"
    );
    model[..65536].copy_from_slice(&noise(4, 65536));
    a.send_epoch("root", 3, w(3), &[(0, 65536)], 3, reader(model.clone()))
        .await
        .unwrap();
    assert!(server.image("laptop", "root") == model);
    drop(a);
    drop(server);

    // Another server on the same store, with nothing of its own: its
    // upgrade makes every volume's image from the store.
    let other = dir.path().join("other");
    let init = cli_at(&other, &["init", "--listen", "127.0.0.1:0"]);
    assert!(init.status.success(), "{init:?}");
    let text = std::fs::read_to_string(data.join("server.toml")).unwrap();
    let store_section = &text[text.find("[store]").unwrap()..];
    let store_section = if s3 {
        store_section.to_string()
    } else {
        store_section.replace(
            "url = \"store\"",
            &format!("url = \"file://{}\"", data.join("store").display()),
        )
    };
    let mine = std::fs::read_to_string(other.join("server.toml")).unwrap();
    let mine = format!("{}{store_section}", &mine[..mine.find("[store]").unwrap()]);
    std::fs::write(other.join("server.toml"), mine).unwrap();
    let up = cli_at(&other, &["upgrade"]);
    assert!(up.status.success(), "{up:?}");
    let said = String::from_utf8_lossy(&up.stdout);
    assert!(said.contains("laptop/root: version 3"), "{said}");
    let image =
        |d: &Path, c: &str| std::fs::read(d.join("volumes").join(c).join("root/image")).unwrap();
    assert!(image(&other, "laptop") == model);
    assert!(image(&other, "desktop") == clone);
}

/// A block that an epoch holds many times travels once: once the first
/// copy is staged, the server answers the client's question about the
/// next batches' digests as held (the store has none of them yet), and
/// stages each copy again from the first one's frame, compressed or raw.
/// The image is the epoch exactly, in a first sync (staged direct) and a
/// later epoch, and the store keeps one chunk per distinct block.
#[tokio::test(flavor = "multi_thread")]
async fn a_block_repeated_in_an_epoch_travels_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (_, a) = enrolled(&server, dir.path(), "laptop").await;
    const B: usize = 65536;
    let size: u64 = 64 << 20;
    let blocks = size as usize / B;
    let all: Vec<(u64, u32)> = (0..blocks as u64)
        .map(|i| (i * B as u64, B as u32))
        .collect();
    let text = pattern(9, B);
    let random = noise(11, B);
    // Blocks 0 and 1 are the two repeated ones, then every block from 256
    // on is one of them (the rest distinct). Each of the client's four
    // streams asks about its next batch (32 blocks) before it sends one,
    // so up to 256 blocks are asked about before the first is staged.
    let mut model = noise(1, size as usize);
    for k in (0..2).chain(256..blocks) {
        let b = if k % 2 == 0 { &text } else { &random };
        model[k * B..][..B].copy_from_slice(b);
    }
    a.open_volume("root", size).await.unwrap();
    let first = a
        .send_epoch("root", 1, w(1), &all, 3, reader(model.clone()))
        .await
        .unwrap();
    let repeats = (blocks - 256) as u64 * B as u64;
    // Copies asked about before the first one was staged still travel.
    assert!(
        first.known_bytes >= repeats / 2 && first.known_bytes <= repeats,
        "{first:?}"
    );
    assert!(
        first.wire_bytes < size - repeats / 2,
        "{} bytes travelled for {} distinct",
        first.wire_bytes,
        256 * B
    );
    assert!(server.image("laptop", "root") == model, "epoch 1 differs");
    assert_eq!(store_json(&data)["chunks"], 256);
    // A later epoch repeats a new block (not the store's yet).
    let new = noise(12, B);
    for k in (0..blocks).step_by(2) {
        model[k * B..][..B].copy_from_slice(&new);
    }
    let even: Vec<(u64, u32)> = all.iter().copied().step_by(2).collect();
    let second = a
        .send_epoch("root", 2, w(2), &even, 3, reader(model.clone()))
        .await
        .unwrap();
    assert!(
        second.known_bytes >= (blocks as u64 / 2 - 288) * B as u64,
        "{second:?}"
    );
    assert!(server.image("laptop", "root") == model, "epoch 2 differs");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wire_carries_only_what_the_client_s_own_volumes_do_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (a_id, a) = enrolled(&server, dir.path(), "laptop").await;
    let (b_id, b) = enrolled(&server, dir.path(), "desktop").await;
    const B: usize = 65536;
    let size: u64 = 4 << 20;
    let all: Vec<(u64, u32)> = (0..size / B as u64)
        .map(|i| (i * B as u64, B as u32))
        .collect();
    let mut model = noise(1, size as usize);
    model[B..2 * B].fill(0);
    a.open_volume("root", size).await.unwrap();
    let first = a
        .send_epoch("root", 1, w(1), &all, 3, reader(model.clone()))
        .await
        .unwrap();
    assert_eq!(first.known_bytes, 0, "{first:?}");

    // Another client mirrors a clone: the store deduplicates it, but the
    // desktop may not learn what the laptop holds, so all of it travels.
    let mut clone = model.clone();
    clone[..B].copy_from_slice(&noise(2, B));
    b.open_volume("root", size).await.unwrap();
    let desktop = |epoch| Writer {
        device: [8; 16],
        epoch,
    };
    let shipped = b
        .send_epoch("root", 1, desktop(1), &all, 3, reader(clone.clone()))
        .await
        .unwrap();
    assert_eq!(shipped.known_bytes, 0, "{shipped:?}");
    assert!(shipped.wire_bytes > 60 * B as u64, "{shipped:?}");
    assert_eq!(store_json(&data)["chunks"], 64);

    // The laptop, after a server restart (its reference set read from the
    // store), mirrors a copy of its own disk as a second volume, with one
    // block new and one moved: only the new block travels.
    drop((a, b));
    drop(server);
    let server = Server::start(&data);
    let a = Link::connect(&a_id, token_fp(&data), &server.address)
        .await
        .unwrap();
    let b = Link::connect(&b_id, token_fp(&data), &server.address)
        .await
        .unwrap();
    let mut copy = model.clone();
    copy[5 * B..6 * B].copy_from_slice(&noise(3, B));
    copy.copy_within(7 * B..8 * B, 9 * B);
    a.open_volume("copy", size).await.unwrap();
    let shipped = a
        .send_epoch("copy", 1, w(2), &all, 3, reader(copy.clone()))
        .await
        .unwrap();
    // 64 blocks: one hole, one new, 62 the laptop's volumes hold.
    assert_eq!(shipped.known_bytes, 62 * B as u64, "{shipped:?}");
    assert_eq!(shipped.zero_bytes, B as u64, "{shipped:?}");
    assert!(
        shipped.wire_bytes <= B as u64 + 1024,
        "{} bytes travelled for one new block",
        shipped.wire_bytes
    );
    assert!(
        server.image("laptop", "copy") == copy,
        "the copy's image differs"
    );
    assert_eq!(store_json(&data)["chunks"], 65);

    // A chunk only the desktop sent travels whole from the laptop too,
    // though the store holds it; once the laptop published it, it is the
    // laptop's (a set held grows with each epoch published).
    model[..B].copy_from_slice(&clone[..B]);
    let shipped = a
        .send_epoch("root", 2, w(3), &[(0, B as u32)], 3, reader(model.clone()))
        .await
        .unwrap();
    assert_eq!(shipped.known_bytes, 0, "{shipped:?}");
    let shipped = a
        .send_epoch("copy", 2, w(4), &[(0, B as u32)], 3, reader(model.clone()))
        .await
        .unwrap();
    assert_eq!(shipped.known_bytes, B as u64, "{shipped:?}");

    // A client that names a chunk it was never told of (the desktop's
    // newest) gets no bytes from it: the block is asked for again.
    let secret = noise(5, B);
    clone[3 * B..4 * B].copy_from_slice(&secret);
    b.send_epoch(
        "root",
        2,
        desktop(2),
        &[(3 * B as u64, B as u32)],
        3,
        reader(clone.clone()),
    )
    .await
    .unwrap();
    let (mut control, mut answers) = begin(&a, "root", 3, w(5)).await;
    assert!(matches!(
        wire::expect(&mut answers).await.unwrap(),
        Message::Staged { done: true, .. }
    ));
    let known = |offset: u64, content: &[u8]| Message::Block {
        offset,
        len: B as u32,
        sha256: Sha256::digest(content).into(),
        encoding: Encoding::Known,
        data_len: 0,
    };
    assert_eq!(
        data_stream(
            &a,
            "root",
            3,
            &[
                (known(0, &secret), vec![]),
                (known(2 * B as u64, &model[4 * B..5 * B]), vec![]),
            ]
        )
        .await,
        Message::Resend {
            blocks: vec![(0, B as u32)]
        }
    );
    let (header, payload) = encode_block(0, &secret, 3);
    assert_eq!(
        data_stream(&a, "root", 3, &[(header, payload)]).await,
        Message::Resend { blocks: vec![] }
    );
    wire::send(&mut control, &Message::EndEpoch).await.unwrap();
    assert_eq!(
        wire::expect(&mut answers).await.unwrap(),
        Message::Committed { epoch: 3 }
    );
    model[..B].copy_from_slice(&secret);
    model.copy_within(4 * B..5 * B, 2 * B);
    assert!(server.image("laptop", "root") == model);

    // A client of the last version is spoken to in it, and may not ask.
    let (mut send, mut recv, version) = a.stream_at(Version::V2).await.unwrap();
    assert_eq!(version, Version::V2);
    wire::send(
        &mut send,
        &Message::OpenVolume {
            volume: "root".into(),
            size,
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        wire::expect(&mut recv).await.unwrap(),
        Message::VolumeInfo {
            published_epoch: 3,
            ..
        }
    ));
    let (_control, mut answers) = begin(&a, "root", 4, w(6)).await;
    assert!(matches!(
        wire::expect(&mut answers).await.unwrap(),
        Message::Staged { done: true, .. }
    ));
    let (mut send, mut recv, _) = a.stream_at(Version::V2).await.unwrap();
    wire::send(
        &mut send,
        &Message::EpochData {
            volume: "root".into(),
            epoch: 4,
        },
    )
    .await
    .unwrap();
    wire::send(&mut send, &Message::HaveChunks { digests: vec![] })
        .await
        .unwrap();
    // A protocol violation: the connection ends, with the reason.
    let got = wire::recv(&mut recv).await;
    assert!(!matches!(got, Ok(Some(_))), "{got:?}");
    tokio::time::timeout(Duration::from_secs(10), a.closed())
        .await
        .unwrap();
    let why = a.close_reason().unwrap_or_default();
    assert!(why.contains("HaveChunks"), "{why}");
}

/// A free TCP port on 127.0.0.1 (for a listener the server binds).
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A data directory under `dir` (on SeaweedFS when the tests ask for S3)
/// whose server.toml, changed by `edit`, serves metrics on a free port:
/// the directory and that address.
fn with_metrics(dir: &Path, edit: impl FnOnce(String) -> String) -> (PathBuf, String) {
    let data = dir.join("data");
    let init = cli_at(&data, &["init", "--listen", "127.0.0.1:0"]);
    assert!(init.status.success(), "{init:?}");
    if std::env::var("MIRROR_TEST_STORE").as_deref() == Ok("s3") {
        on_seaweed(&data);
    }
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let config = edit(std::fs::read_to_string(data.join("server.toml")).unwrap());
    let config = format!("{config}\n[metrics]\nlisten = \"{metrics}\"\n");
    std::fs::write(data.join("server.toml"), config).unwrap();
    (data, metrics)
}

/// `GET /metrics` at `addr`, read by Prometheus' own parser.
fn scrape(addr: &str) -> Vec<common::prom::Sample> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    common::prom::parse(body)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_in_prometheus_format_and_move_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (data, metrics) = with_metrics(dir.path(), |config| config);
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("root", 1 << 20).await.unwrap();
    let model = noise(21, 1 << 20);
    let blocks: Vec<(u64, u32)> = (0..4).map(|i| (i * 65536, 65536)).collect();
    link.send_epoch("root", 1, w(1), &blocks, 3, reader(model.clone()))
        .await
        .unwrap();
    let laptop = [("client", "laptop")];
    let root = [("client", "laptop"), ("volume", "root")];
    let m = scrape(&metrics);
    assert_eq!(sample(&m, "mirror_epochs_received_total", &laptop), 1.0);
    assert_eq!(sample(&m, "mirror_blocks_received_total", &laptop), 4.0);
    assert!(sample(&m, "mirror_received_wire_bytes_total", &laptop) >= 4.0 * 65536.0);
    assert_eq!(sample(&m, "mirror_volume_published_epoch", &root), 1.0);
    assert_eq!(sample(&m, "mirror_volume_size_bytes", &root), 1048576.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let published = sample(&m, "mirror_volume_last_publish_timestamp_seconds", &root);
    assert!((now - published).abs() < 120.0, "{published} vs {now}");
    assert!(sample(&m, "mirror_connections", &[]) >= 1.0);
    assert_eq!(sample(&m, "mirror_store_chunks", &[]), 4.0);
    assert!(sample(&m, "process_resident_memory_bytes", &[]) > 1e6);

    // An export and its readers: a connection open on its portal counts
    // while it is open; a stopped export's series is gone.
    let portal = format!("127.0.0.1:{}", free_tcp_port());
    let out = server.cli(&["export", "laptop/root", "--listen", &portal]);
    assert!(out.status.success(), "{out:?}");
    let iqn = "iqn.2026-11.org.ublk-mirror:laptop.root.now";
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(iqn),
        "{out:?}"
    );
    let readers =
        |m: &[common::prom::Sample]| sample(m, "mirror_export_connections", &[("target", iqn)]);
    let reader_conn = std::net::TcpStream::connect(&portal).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&metrics);
        if readers(&m) == 1.0 || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sample(&m, "mirror_exports", &[]), 1.0);
    assert_eq!(readers(&m), 1.0);
    // `exports` lists it, with the reader, as a table and as JSON.
    let out = server.cli(&["exports"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.ends_with(iqn))
        .unwrap_or_else(|| panic!("{table}"));
    for want in ["laptop/root", &portal, "read-only", " 1  "] {
        assert!(row.contains(want), "{want:?} not in {row:?}");
    }
    let out = server.cli(&["exports", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["iqn"], iqn);
    assert_eq!(list[0]["volume"], "laptop/root");
    assert_eq!(list[0]["portal"], portal.as_str());
    assert_eq!(list[0]["writable"], false);
    assert_eq!(list[0]["connections"], 1);
    drop(reader_conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while readers(&scrape(&metrics)) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection is still counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = server.cli(&["unexport", iqn]);
    assert!(out.status.success(), "{out:?}");
    let out = server.cli(&["exports", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]", "{out:?}");
    let m = scrape(&metrics);
    assert_eq!(sample(&m, "mirror_exports", &[]), 0.0);
    assert!(
        !m.iter()
            .any(|(name, _, _)| name == "mirror_export_connections"),
        "{m:?}"
    );

    // Another epoch, a block damaged on the way, a block the server holds:
    // the counters follow.
    let mut changed = model.clone();
    changed[..65536].copy_from_slice(&model[65536..131072]);
    link.send_epoch("root", 2, w(2), &[(0, 65536)], 3, reader(changed))
        .await
        .unwrap();
    let (_control, mut answers) = begin(&link, "root", 3, w(3)).await;
    wire::expect(&mut answers).await.unwrap();
    let good = noise(22, 4096);
    let mut bad = good.clone();
    bad[0] ^= 1;
    let header = Message::Block {
        offset: 0,
        len: 4096,
        sha256: Sha256::digest(&good).into(),
        encoding: Encoding::Raw,
        data_len: 4096,
    };
    data_stream(&link, "root", 3, &[(header, bad)]).await;
    let m = scrape(&metrics);
    assert_eq!(sample(&m, "mirror_epochs_received_total", &laptop), 2.0);
    assert_eq!(
        sample(&m, "mirror_deduplicated_wire_bytes_total", &laptop),
        65536.0
    );
    assert_eq!(sample(&m, "mirror_hash_mismatches_total", &laptop), 1.0);
    assert_eq!(sample(&m, "mirror_volume_published_epoch", &root), 2.0);
}

/// The schedules show in the metrics: scheduled snapshots that the
/// retention prunes (three in one hour keep one), and the chunk store's
/// verification with its findings.
#[tokio::test(flavor = "multi_thread")]
async fn retention_and_verification_show_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (data, metrics) = with_metrics(dir.path(), |config| {
        assert!(config.contains("every = \"1h\"") && config.contains("verify_every = \"168h\""));
        config
            .replace("every = \"1h\"", "every = \"1s\"")
            .replace("verify_every = \"168h\"", "verify_every = \"1s\"")
    });
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("root", 1 << 20).await.unwrap();
    let root = [("client", "laptop"), ("volume", "root")];
    for epoch in 1..=3u64 {
        let content = noise(30 + epoch, 1 << 20);
        link.send_epoch("root", epoch, w(epoch), &[(0, 65536)], 3, reader(content))
            .await
            .unwrap();
        // the next scheduled snapshot takes this epoch
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let listed = server.cli(&["snapshots", "laptop/root", "--json"]);
            let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
            let newest = listed
                .as_array()
                .and_then(|a| a.last())
                .map(|s| s["epoch"].clone());
            if newest == Some(epoch.into()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no snapshot of epoch {epoch}: {listed}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = scrape(&metrics);
        let pruned = m
            .iter()
            .any(|(n, _, v)| n == "mirror_snapshots_pruned_total" && *v >= 1.0);
        if pruned && sample(&m, "mirror_verify_runs_total", &[]) >= 1.0 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Three in one hour (or two, across an hour's end): at least one went.
    assert!(sample(&m, "mirror_snapshots_pruned_total", &root) >= 1.0);
    assert_eq!(sample(&m, "mirror_verify_unrepaired_objects", &[]), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = sample(&m, "mirror_verify_last_timestamp_seconds", &[]);
    assert!((now - last).abs() < 120.0, "{last} vs {now}");
}

/// A second server for `data`'s chunk store: its own data directory with
/// the first one's identity and clients (what makes servers
/// interchangeable for a client), and `data`'s `[store]`.
fn second_server_dir(data: &Path, other: &Path) {
    let init = cli_at(other, &["init", "--listen", "127.0.0.1:0"]);
    assert!(init.status.success(), "{init:?}");
    for shared in ["identity", "clients"] {
        let _ = std::fs::remove_dir_all(other.join(shared));
        std::fs::create_dir_all(other.join(shared)).unwrap();
        for f in std::fs::read_dir(data.join(shared)).unwrap().flatten() {
            std::fs::copy(f.path(), other.join(shared).join(f.file_name())).unwrap();
        }
    }
    let text = std::fs::read_to_string(data.join("server.toml")).unwrap();
    let section = text[text.find("[store]").unwrap()..].replace(
        "url = \"store\"",
        &format!("url = \"file://{}\"", data.join("store").display()),
    );
    let mine = std::fs::read_to_string(other.join("server.toml")).unwrap();
    let mine = format!("{}{section}", &mine[..mine.find("[store]").unwrap()]);
    std::fs::write(other.join("server.toml"), mine).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_fails_over_to_another_server_on_the_same_store_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data_a = dir.path().join("a");
    let data_b = dir.path().join("b");
    let mut a = Server::start(&data_a);
    let (id, enrolled_link) = enrolled(&a, dir.path(), "laptop").await;
    drop(enrolled_link);
    second_server_dir(&data_a, &data_b);
    let b = Server::start(&data_b);
    // The client knows both (as `client add --address A,B` would say).
    let both = format!("{},{}", a.address, b.address);
    let fp = token_fp(&data_a);
    let size: u64 = 4 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();

    let link = Link::connect(&id, fp, &both).await.unwrap();
    assert_eq!(
        link.open_volume("root", size)
            .await
            .unwrap()
            .published_epoch,
        0
    );
    let one = noise(21, size as usize);
    link.send_epoch("root", 1, w(1), &all, 3, reader(one.clone()))
        .await
        .unwrap();
    assert!(a.image("laptop", "root") == one);

    // Epoch 2 is on its way when the serving server dies (kill -9).
    let mut two = one.clone();
    for i in (0..64).step_by(5) {
        two[i * 65536..][..65536].copy_from_slice(&noise(100 + i as u64, 65536));
    }
    // Slow enough that no batch is read by the kill, however many
    // blocks the client reads at once (four parts of 8 blocks: 0.8 s).
    let slow = {
        let two = two.clone();
        move |o: u64, l: u32| {
            std::thread::sleep(Duration::from_millis(100));
            Ok(two[o as usize..][..l as usize].to_vec())
        }
    };
    let shipping = link.send_epoch("root", 2, w(2), &all, 1, slow);
    let killed = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.child.kill().unwrap();
        a.child.wait().unwrap();
    };
    let (sent, ()) = tokio::join!(shipping, killed);
    assert!(sent.is_err(), "epoch 2 went through before the kill");
    drop(link);

    // The client reconnects: the first address is dead, the second
    // answers with the same certificate and takes the volume over from
    // the store, at epoch 1.
    let link = Link::connect(&id, fp, &both).await.unwrap();
    let info = link.open_volume("root", size).await.unwrap();
    assert_eq!(info.published_epoch, 1);
    assert!(b.image("laptop", "root") == one, "B's image is not epoch 1");
    link.send_epoch("root", 2, w(2), &all, 3, reader(two.clone()))
        .await
        .unwrap();
    assert!(b.image("laptop", "root") == two);
    // Published once, by B; epoch 1 by A.
    let store = store_json(&data_b);
    assert_eq!(store["volumes"][0]["versions"], 2, "{store}");
    assert_eq!(store["volumes"][0]["epoch"], 2, "{store}");

    // A comes back: it catches up from the store, and serves epoch 3 on
    // top of B's epoch 2.
    drop(link);
    let a = Server::start(&data_a);
    // Asked for the volume's version now before any client opened it
    // there, A looks in the store first: B's epoch 2, not its own 1.
    let reading = Link::connect(&id, fp, &a.address).await.unwrap();
    let read = reading.read_version("root", None).await.unwrap();
    assert_eq!(read.info().epoch, 2, "A served its stale image as now");
    read.finish();
    drop(reading);
    let link = Link::connect(&id, fp, &format!("{},{}", a.address, b.address))
        .await
        .unwrap();
    assert_eq!(
        link.open_volume("root", size)
            .await
            .unwrap()
            .published_epoch,
        2
    );
    assert!(a.image("laptop", "root") == two, "A did not catch up");
    let mut three = two.clone();
    three[..65536].fill(0);
    link.send_epoch("root", 3, w(3), &[(0, 65536)], 3, reader(three.clone()))
        .await
        .unwrap();
    assert!(a.image("laptop", "root") == three);
    let store = store_json(&data_a);
    assert_eq!(store["volumes"][0]["versions"], 3, "{store}");

    // The client moves to B while A lives on (a network split): B
    // publishes epoch 4. Asked for the volume now, or for a snapshot of
    // it, A (whose cache holds epoch 3) looks in the store first.
    drop(link);
    let link = Link::connect(&id, fp, &b.address).await.unwrap();
    assert_eq!(
        link.open_volume("root", size)
            .await
            .unwrap()
            .published_epoch,
        3
    );
    let mut four = three.clone();
    four[65536..2 * 65536].fill(7);
    link.send_epoch("root", 4, w(4), &[(65536, 65536)], 3, reader(four.clone()))
        .await
        .unwrap();
    drop(link);
    let reading = Link::connect(&id, fp, &a.address).await.unwrap();
    let read = reading.read_version("root", None).await.unwrap();
    assert_eq!(read.info().epoch, 4, "A served its stale cache as now");
    read.finish();
    let snap = a.cli(&["snapshot", "laptop/root", "after-four"]);
    assert!(snap.status.success(), "{snap:?}");
    assert!(
        String::from_utf8_lossy(&snap.stdout).contains("epoch 4"),
        "{}",
        String::from_utf8_lossy(&snap.stdout)
    );
}

/// The scheduled snapshots one server took, pinned in the shared chunk
/// store, are pruned by the retention of the server the client moved to
/// (which lists them as `stored`): else nothing ever pruned them, and
/// the store kept their versions for good.
#[tokio::test(flavor = "multi_thread")]
async fn retention_prunes_the_scheduled_snapshots_another_server_took() {
    let dir = tempfile::tempdir().unwrap();
    let data_a = dir.path().join("a");
    let data_b = dir.path().join("b");
    let every_second = |data: &Path| {
        let config = std::fs::read_to_string(data.join("server.toml")).unwrap();
        assert!(config.contains("every = \"1h\""), "{config}");
        let config = config.replace("every = \"1h\"", "every = \"1s\"");
        std::fs::write(data.join("server.toml"), config).unwrap();
    };
    let init = cli_at(&data_a, &["init", "--listen", "127.0.0.1:0"]);
    assert!(init.status.success(), "{init:?}");
    if std::env::var("MIRROR_TEST_STORE").as_deref() == Ok("s3") {
        on_seaweed(&data_a);
    }
    every_second(&data_a);
    let mut a = Server::start(&data_a);
    let (id, link) = enrolled(&a, dir.path(), "laptop").await;
    let fp = token_fp(&data_a);
    link.open_volume("root", 1 << 20).await.unwrap();
    let listed = |data: &Path| -> Vec<(String, String)> {
        let out = cli_at(data, &["snapshots", "laptop/root", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let field = |k: &str| s[k].as_str().unwrap().to_string();
                (field("name"), field("kind"))
            })
            .collect()
    };
    // All in one hour (retention's buckets): a run that would cross an
    // hour's end waits for it first.
    let into_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 3600;
    if into_hour > 3600 - 90 {
        tokio::time::sleep(Duration::from_secs(3600 - into_hour + 1)).await;
    }
    // A takes a scheduled snapshot of each of three epochs (and prunes
    // its own: the newest, and the newest of the rest in the hour).
    for epoch in 1..=3u64 {
        let content = noise(40 + epoch, 1 << 20);
        link.send_epoch("root", epoch, w(epoch), &[(0, 65536)], 3, reader(content))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let out = cli_at(&data_a, &["snapshots", "laptop/root", "--json"]);
            let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if listed
                .as_array()
                .and_then(|a| a.last())
                .map(|s| s["epoch"].clone())
                == Some(epoch.into())
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{listed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Its turn over (it pruned epoch 1's, after pinning epoch 3's): two
    // left, in the store too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while listed(&data_a).len() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            listed(&data_a)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(link);
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let of_a: Vec<String> = listed(&data_a).into_iter().map(|(n, _)| n).collect();
    assert_eq!(of_a.len(), 2, "{of_a:?}");

    // The client moves to B, on the same store, whose schedule then takes
    // its own snapshot and prunes A's: in the same hour as B's, the older
    // goes (the newer stays: the first in the hour after the newest of
    // all, B's).
    second_server_dir(&data_a, &data_b);
    every_second(&data_b);
    let b = Server::start(&data_b);
    let link = Link::connect(&id, fp, &b.address).await.unwrap();
    assert_eq!(
        link.open_volume("root", 1 << 20)
            .await
            .unwrap()
            .published_epoch,
        3
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = listed(&data_b);
        let stored: Vec<_> = now.iter().filter(|(_, k)| k == "stored").collect();
        let own = now.iter().filter(|(_, k)| k == "scheduled").count();
        if own == 1 && stored.len() == 1 {
            assert_eq!(Some(&stored[0].0), of_a.last(), "{now:?} {of_a:?}");
            // The client's own listing (V6) shows A's as stored too (B's
            // own may have moved on since).
            let listing = link.list_snapshots("root").await.unwrap();
            assert_eq!(listing.incomplete, None);
            let stored_too: Vec<String> = listing
                .snapshots
                .into_iter()
                .filter(|s| s.kind == "stored")
                .map(|s| s.name)
                .collect();
            assert_eq!(stored_too, [stored[0].0.clone()]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client lists its own volume's snapshots (V6): every one, oldest
/// first, over as many frames as they take; a volume it does not have is
/// refused with the ones it has; a V5 stream may not ask.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_lists_its_snapshots_in_as_many_frames_as_they_take() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    link.open_volume("root", 1 << 20).await.unwrap();
    let listing = link.list_snapshots("root").await.unwrap();
    assert!(listing.snapshots.is_empty(), "{listing:?}");
    assert_eq!(listing.incomplete, None);
    link.send_epoch("root", 1, w(1), &[(0, 65536)], 3, reader(noise(1, 1 << 20)))
        .await
        .unwrap();
    link.snapshot("root", Some("first")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    link.send_epoch("root", 2, w(2), &[(0, 65536)], 3, reader(noise(2, 1 << 20)))
        .await
        .unwrap();
    // More than one frame holds.
    let many = ublk_mirror_common::proto::MAX_LISTED + 44;
    for i in 0..many {
        link.snapshot("root", Some(&format!("s{i:03}")))
            .await
            .unwrap();
    }
    let listing = link.list_snapshots("root").await.unwrap();
    assert_eq!(listing.incomplete, None);
    let got = &listing.snapshots;
    assert_eq!(got.len(), many + 1);
    assert_eq!(
        (got[0].name.as_str(), got[0].epoch, got[0].kind.as_str()),
        ("first", 1, "manual")
    );
    let mut names: Vec<&str> = got[1..].iter().map(|s| s.name.as_str()).collect();
    names.sort();
    let want: Vec<String> = (0..many).map(|i| format!("s{i:03}")).collect();
    assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(got[1..].iter().all(|s| s.epoch == 2 && s.kind == "manual"));
    assert!(
        got.windows(2)
            .all(|p| (p[0].epoch_ms, p[0].created_ms) <= (p[1].epoch_ms, p[1].created_ms)),
        "not oldest first"
    );
    // The server's own listing says the same.
    let out = server.cli(&["snapshots", "laptop/root", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs: Vec<(String, u64)> = theirs
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["epoch"].as_u64().unwrap(),
            )
        })
        .collect();
    let ours: Vec<(String, u64)> = got.iter().map(|s| (s.name.clone(), s.epoch)).collect();
    assert_eq!(ours, theirs);

    // A chunk store that cannot be read (here a damaged pin): the
    // server's own snapshots, and a note saying the list may lack some.
    if std::env::var("MIRROR_TEST_STORE").as_deref() != Ok("s3") {
        let pins = walkdir(&data)
            .into_iter()
            .find(|p| p.ends_with("pins/first"))
            .expect("the store's pin of snapshot first")
            .with_file_name("damaged");
        std::fs::write(&pins, b"not a pin").unwrap();
        let listing = link.list_snapshots("root").await.unwrap();
        assert_eq!(listing.snapshots.len(), many + 1);
        let note = listing.incomplete.expect("the store's failure said");
        assert!(note.contains("may be missing"), "{note}");
        // The store's own words stay in the server's log.
        assert!(!note.contains("damaged"), "{note}");
        std::fs::remove_file(&pins).unwrap();
    }

    // Another client sees none of them: "root" is not its volume.
    let (_other_id, other) = enrolled(&server, dir.path(), "desk").await;
    other.open_volume("home", 1 << 20).await.unwrap();
    let err = other.list_snapshots("root").await.unwrap_err().to_string();
    assert!(
        err.contains("no volume root") && err.contains("home"),
        "{err}"
    );

    // On a stream that speaks V5, asking is a protocol violation.
    let (mut send, mut recv, version) = link.stream_at(Version::V5).await.unwrap();
    assert_eq!(version, Version::V5);
    wire::send(
        &mut send,
        &Message::ListSnapshots {
            volume: "root".into(),
        },
    )
    .await
    .unwrap();
    // A protocol violation: the connection ends, with no answer.
    let got = wire::recv(&mut recv).await;
    assert!(!matches!(got, Ok(Some(_))), "{got:?}");
    tokio::time::timeout(Duration::from_secs(10), link.closed())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_collection_keeps_what_snapshots_and_the_newest_versions_need() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 2 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();
    link.open_volume("root", size).await.unwrap();
    let mut model = noise(31, size as usize);
    link.send_epoch("root", 1, w(1), &all, 3, reader(model.clone()))
        .await
        .unwrap();
    let snap = server.cli(&["snapshot", "laptop/root", "keep"]);
    assert!(snap.status.success(), "{snap:?}");
    // Four more epochs, each rewriting the first 8 blocks.
    for epoch in 2..=5u64 {
        model[..8 * 65536].copy_from_slice(&noise(100 + epoch, 8 * 65536));
        link.send_epoch("root", epoch, w(epoch), &all[..8], 3, reader(model.clone()))
            .await
            .unwrap();
    }
    let before = store_json(&data);
    assert_eq!(before["volumes"][0]["versions"], 5, "{before}");
    let gc = |expect: &str| {
        let out = server.cli(&["gc", "--window", "0s"]);
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(said.contains(expect), "{said}");
    };
    // Versions 2 and 3 go at once; their packs are condemned, then go.
    gc("versions: 2 deleted, 3 kept; packs: 0 deleted");
    gc("packs: 2 deleted");
    let after = store_json(&data);
    assert_eq!(after["volumes"][0]["versions"], 3, "{after}");
    assert!(
        after["object_bytes"].as_u64() < before["object_bytes"].as_u64(),
        "{before} {after}"
    );
    // Deleting the snapshot unpins its version.
    let del = server.cli(&["delete", "laptop/root@keep"]);
    assert!(del.status.success(), "{del:?}");
    let out = server.cli(&["gc", "--window", "0s"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("versions: 1 deleted"),
        "{out:?}"
    );
    // The server goes on; the store still makes the whole volume.
    model[..65536].fill(7);
    link.send_epoch("root", 6, w(6), &all[..1], 3, reader(model.clone()))
        .await
        .unwrap();
    drop(link);
    drop(server);
    std::fs::remove_dir_all(data.join("volumes")).unwrap();
    let up = cli_at(&data, &["upgrade"]);
    assert!(up.status.success(), "{up:?}");
    let image = std::fs::read(data.join("volumes/laptop/root/image")).unwrap();
    assert!(image == model, "the store does not make the volume");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_repairs_from_the_image_and_reports_what_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 1 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();
    link.open_volume("root", size).await.unwrap();
    let model = noise(41, size as usize);
    link.send_epoch("root", 1, w(1), &all, 3, reader(model.clone()))
        .await
        .unwrap();
    let ok = server.cli(&["verify"]);
    assert!(ok.status.success(), "{ok:?}");
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(
        said.contains("16 chunks") && said.contains("0 damaged"),
        "{said}"
    );
    if std::env::var("MIRROR_TEST_STORE").as_deref() == Ok("s3") {
        return; // the damage below is done to files of the directory store
    }
    let pack = std::fs::read_dir(data.join("store/packs"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .next()
        .unwrap()
        .path();
    let rot = |at: usize| {
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[at] ^= 1;
        std::fs::write(&pack, bytes).unwrap();
    };
    // The image here still has the block: repaired.
    rot(100);
    let fixed = server.cli(&["verify", "laptop/root"]);
    assert!(fixed.status.success(), "{fixed:?}");
    assert!(
        String::from_utf8_lossy(&fixed.stdout).contains("1 repaired"),
        "{fixed:?}"
    );
    // With the image gone too, it is reported, exit status 1, and the
    // version is marked damaged.
    drop(link);
    drop(server);
    let packs: Vec<_> = std::fs::read_dir(data.join("store/packs"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .collect();
    for p in &packs {
        let mut bytes = std::fs::read(p).unwrap();
        bytes[200] ^= 1;
        std::fs::write(p, bytes).unwrap();
    }
    std::fs::remove_dir_all(data.join("volumes")).unwrap();
    let bad = cli_at(&data, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let said = String::from_utf8_lossy(&bad.stdout);
    assert!(said.contains("needed by laptop/root@1"), "{said}");
    let store = store_json(&data);
    assert_eq!(
        store["volumes"][0]["damaged"],
        serde_json::json!([1]),
        "{store}"
    );
    // And nothing is served from it: the image is not rebuilt.
    let up = cli_at(&data, &["upgrade"]);
    assert!(!up.status.success(), "{up:?}");
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("does not match its sha256"),
        "{up:?}"
    );
}

/// A block a disk damaged in an image is found by `verify`, which checks
/// each image here against the version it holds, and made the version's
/// again from the chunk store: through the running server (which owns the
/// image), or by `verify` itself when none runs.
#[tokio::test(flavor = "multi_thread")]
async fn verify_makes_a_damaged_image_block_the_version_s_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 1 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();
    link.open_volume("root", size).await.unwrap();
    let mut model = noise(43, size as usize);
    model[5 << 16..6 << 16].fill(0); // a hole: zeroes are checked too
    link.send_epoch("root", 1, w(1), &all, 3, reader(model.clone()))
        .await
        .unwrap();
    let image = data.join("volumes/laptop/root/image");
    let damage = |at: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(b"rot", at).unwrap();
    };
    damage(3 << 16);
    damage((5 << 16) + 7);
    let ok = server.cli(&["verify"]);
    assert!(ok.status.success(), "{ok:?}");
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(
        said.contains("1 images here (16 blocks)")
            && said.contains("2 blocks differed, 2 made the version's again"),
        "{said}"
    );
    assert!(std::fs::read(&image).unwrap() == model, "not repaired");
    let clean = server.cli(&["verify", "laptop/root"]);
    assert!(
        String::from_utf8_lossy(&clean.stdout).contains("0 blocks differed"),
        "{clean:?}"
    );
    // No server: verify repairs it itself, holding the server's lock.
    drop(link);
    drop(server);
    damage(0);
    let ok = cli_at(&data, &["verify", "laptop/root", "--json"]);
    assert!(ok.status.success(), "{ok:?}");
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(
        report["images"]["differed"]["laptop/root"],
        serde_json::json!({"blocks": 16, "damaged": 1, "repaired": 1}),
        "{report}"
    );
    assert_eq!(report["images"]["blocks"], 16, "{report}");
    assert!(std::fs::read(&image).unwrap() == model, "not repaired");
    // Cut short (a file system's repair): made whole again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(size / 2 + 100)
        .unwrap();
    let ok = cli_at(&data, &["verify", "laptop/root", "--json"]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        std::fs::read(&image).unwrap() == model,
        "a short image was not made whole"
    );
    // Gone: the server makes the volume again from the store when it is
    // asked for, and serves it.
    std::fs::remove_file(&image).unwrap();
    let server = Server::start(&data);
    let link = Link::connect(&id, token_fp(&data), &server.address)
        .await
        .unwrap();
    let mut read = link.read_version("root", None).await.unwrap();
    assert_eq!(read.info().epoch, 1);
    read.ask(0, 16, vec![[0u8; 32]; 16]).await.unwrap();
    let mut got = vec![0u8; size as usize];
    loop {
        match read.next().await.unwrap() {
            ReadStep::Block(b) => {
                let at = b.offset as usize;
                if let Some(d) = b.decode().unwrap() {
                    got[at..at + d.len()].copy_from_slice(&d);
                }
            }
            ReadStep::Answered { .. } => break,
            ReadStep::ReadData(_) => unreachable!(),
        }
    }
    read.finish();
    assert!(got == model, "the volume made again is not the version");
    assert!(
        std::fs::read(&image).unwrap() == model,
        "no image made again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_store_refuses_the_commit_and_the_epoch_resumes_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = cli_at(&data, &["init", "--listen", "127.0.0.1:0"]);
    assert!(init.status.success(), "{init:?}");
    let mut weed = common::seaweed::Seaweed::start();
    use_seaweed(&data, &weed);
    let server = Server::start(&data);
    let (_id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 4 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();
    link.open_volume("root", size).await.unwrap();
    let one = noise(51, size as usize);
    link.send_epoch("root", 1, w(1), &all, 3, reader(one.clone()))
        .await
        .unwrap();
    // The store goes away: the epoch arrives but cannot be published.
    weed.stop();
    let mut two = one.clone();
    two[..8 * 65536].copy_from_slice(&noise(52, 8 * 65536));
    let err = link
        .send_epoch("root", 2, w(2), &all[..8], 3, reader(two.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("chunk store"), "{err}");
    assert!(
        server.image("laptop", "root") == one,
        "the image moved without the store"
    );
    // Back: the epoch resumes (its blocks stayed staged) and is published.
    weed.restart();
    assert_eq!(
        link.open_volume("root", size)
            .await
            .unwrap()
            .published_epoch,
        1
    );
    let shipped = link
        .send_epoch("root", 2, w(2), &all[..8], 3, reader(two.clone()))
        .await
        .unwrap();
    assert_eq!(shipped.resumed_bytes, 8 * 65536, "{shipped:?}");
    assert!(server.image("laptop", "root") == two);
    let store = store_json(&data);
    assert_eq!(store["volumes"][0]["versions"], 2, "{store}");
}

/// A restore read from the chunk store (a snapshot this server's cache
/// does not hold) whose store goes out of reach part way is not refused:
/// the stream is reset, which the client takes for a lost link and asks
/// again; once the store is back, it reads on.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_is_not_refused_while_the_chunk_store_is_out_of_reach() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = cli_at(&data, &["init", "--listen", "127.0.0.1:0"]);
    assert!(init.status.success(), "{init:?}");
    let mut weed = common::seaweed::Seaweed::start();
    use_seaweed(&data, &weed);
    // Every chunk read from the bucket: none kept in memory.
    let config = data.join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[store]\n", "[store]\nchunk_cache = \"0\"\n", 1);
    assert!(text.contains("chunk_cache"), "{text}");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&data);
    let (id, link) = enrolled(&server, dir.path(), "laptop").await;
    let size: u64 = 4 << 20;
    let all: Vec<(u64, u32)> = (0..size / 65536).map(|i| (i * 65536, 65536)).collect();
    link.open_volume("root", size).await.unwrap();
    let one = noise(61, size as usize);
    link.send_epoch("root", 1, w(1), &all, 3, reader(one.clone()))
        .await
        .unwrap();
    link.snapshot("root", Some("s1")).await.unwrap();
    drop(link);
    drop(server);
    // The cache lost: s1 is the store's only.
    std::fs::remove_dir_all(data.join("volumes/laptop/root")).unwrap();
    let server = Server::start(&data);
    let link = Link::connect(&id, token_fp(&data), &server.address)
        .await
        .unwrap();
    let block = |n: usize| &one[n * 65536..][..65536];
    let read_one = async |read: &mut ublk_mirror_common::client::VersionRead, n: u64| {
        read.ask(n * 65536, 1, vec![[0u8; 32]]).await?;
        let mut got = None;
        loop {
            match read.next().await? {
                ReadStep::Block(b) => got = b.decode()?,
                ReadStep::Answered { .. } => return Ok::<_, ublk_mirror_common::Error>(got),
                ReadStep::ReadData(_) => unreachable!(),
            }
        }
    };
    let mut read = link.read_version("root", Some("s1")).await.unwrap();
    assert_eq!(read.info().epoch, 1);
    assert!(read_one(&mut read, 0).await.unwrap().as_deref() == Some(block(0)));
    weed.stop();
    match read_one(&mut read, 60).await {
        Err(e) => assert_eq!(e.kind(), ublk_mirror_common::ErrorKind::Link, "{e}"),
        Ok(_) => panic!("a block was read with the store out of reach (from a cache?)"),
    }
    weed.restart();
    let mut read = link.read_version("root", Some("s1")).await.unwrap();
    assert!(read_one(&mut read, 60).await.unwrap().as_deref() == Some(block(60)));
    read.finish();
}

/// Every file under `dir`, at any depth.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// A second server (or an upgrade) on the same data directory is
/// refused, naming the process that serves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_server_on_the_same_data_names_the_one_that_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let holder = format!("pid {}: serve", server.child.id());
    for args in [&["serve"][..], &["upgrade"]] {
        let out = server.cli(args);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&holder), "{args:?}: {err}");
    }
}
