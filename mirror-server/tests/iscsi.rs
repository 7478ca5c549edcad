//! The iSCSI export against real initiators on 127.0.0.1: libiscsi's
//! tools and qemu. A volume with data, holes and two versions is made with
//! the store's own API; `mirror-server export` serves a version of it.
//! Without libiscsi-bin and qemu-block-extra (scripts/deps installs them)
//! the tests say so and pass, except under CI, where they fail.

mod common;
use common::noise;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use mirror_server::snapshots::Kind;
use mirror_server::store::Volume;
use sha2::{Digest as _, Sha256};
use ublk_mirror_common::proto::{Encoding, Writer};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirror-server")
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "{tool} is missing (scripts/deps installs it)"
        );
        eprintln!("skipped: {tool} is missing (scripts/deps installs it)");
    }
    found
}

const SIZE: u64 = 64 << 20;

/// A volume `laptop/root`: epoch 1 has data in the first 4 MiB and at
/// 32 MiB, holes elsewhere; snapshot "first"; epoch 2 rewrites the first
/// MiB. Returns both images.
fn make_volume(data: &Path) -> (Vec<u8>, Vec<u8>) {
    make_volume_in(data, false)
}

/// [`make_volume`], with every epoch and the snapshot kept in the data
/// directory's chunk store too (`stored`), as a running server does.
fn make_volume_in(data: &Path, stored: bool) -> (Vec<u8>, Vec<u8>) {
    let init = Command::new(bin())
        .arg("--data")
        .arg(data)
        .args(["init", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let mut v = Volume::create(&data.join("volumes/laptop/root"), SIZE).unwrap();
    if stored {
        let config = mirror_server::config::ServerConfig::load(
            &data.join(mirror_server::config::CONFIG_FILE),
        )
        .unwrap();
        v.attach(config.chunk_store(data).unwrap(), "laptop/root")
            .unwrap();
    }
    let me = |epoch| Writer {
        device: [1; 16],
        epoch,
    };
    let mut one = vec![0u8; SIZE as usize];
    one[..4 << 20].copy_from_slice(&noise(1, 4 << 20));
    one[32 << 20..][..1 << 20].copy_from_slice(&noise(2, 1 << 20));
    let s = v.begin(1, me(1)).unwrap();
    for at in (0..SIZE).step_by(1 << 20) {
        let block = &one[at as usize..][..1 << 20];
        if block.iter().any(|&b| b != 0) {
            let d: [u8; 32] = Sha256::digest(block).into();
            s.add(at, 1 << 20, &d, Encoding::Raw, block).unwrap();
        }
    }
    v.commit(&s).unwrap();
    v.snapshot(Some("first"), Kind::Manual).unwrap();
    let mut two = one.clone();
    two[..1 << 20].copy_from_slice(&noise(3, 1 << 20));
    let s = v.begin(2, me(2)).unwrap();
    let d: [u8; 32] = Sha256::digest(&two[..1 << 20]).into();
    s.add(0, 1 << 20, &d, Encoding::Raw, &two[..1 << 20])
        .unwrap();
    v.commit(&s).unwrap();
    (one, two)
}

struct Export {
    child: Child,
    url: String,
    /// Where its log (stderr) goes.
    log: tempfile::NamedTempFile,
}

impl Export {
    fn start(data: &Path, target: &str, port: u16, extra: &[&str]) -> Export {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(bin())
            .arg("--data")
            .arg(data)
            .args(["export", target, "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut url = String::new();
        for _ in 0..8 {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(u) = line.trim().strip_prefix("iscsi://") {
                url = format!("iscsi://{u}");
                break;
            }
        }
        assert!(!url.is_empty(), "export printed no URL");
        std::thread::spawn(move || for _ in out.lines() {});
        Export { child, url, log }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `iscsi-inq URL`: whether it got in, and what it printed.
fn inq(url: &str) -> (bool, String) {
    let o = Command::new("iscsi-inq").arg(url).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Copy the whole LUN at `url` into `out` with qemu-img.
fn copy(url: &str, out: &Path) {
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(url)
        .arg(out)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{conv:?}");
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn qemu_img_copies_a_snapshot_byte_for_byte_and_skips_holes() {
    if !have("qemu-img") || !have("iscsi-inq") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (one, two) = make_volume(&data);
    let export = Export::start(&data, "laptop/root@first", port(), &[]);
    let inq = Command::new("iscsi-inq").arg(&export.url).output().unwrap();
    assert!(inq.status.success(), "{inq:?}");
    assert!(
        String::from_utf8_lossy(&inq.stdout).contains("UBLKMIRR"),
        "{inq:?}"
    );
    let out = dir.path().join("first.raw");
    copy(&export.url, &out);
    assert!(
        std::fs::read(&out).unwrap() == one,
        "the copy is not snapshot first"
    );
    assert!(std::fs::read(&out).unwrap() != two);
    // Again with CRC32C header digests (libiscsi offers no data digest;
    // open-iscsi checks both in the VM suite, t97).
    let (portal, iqn) = export.url["iscsi://".len()..]
        .trim_end_matches("/0")
        .split_once('/')
        .unwrap();
    let digested = dir.path().join("digested.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--image-opts"])
        .arg(format!(
            "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=0,header-digest=crc32c"
        ))
        .arg(&digested)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{conv:?}");
    assert!(std::fs::read(&digested).unwrap() == one, "with digests");
    let log = std::fs::read_to_string(export.log.path()).unwrap();
    assert!(log.contains("header_digest=\"CRC32C\""), "{log}");
    // Holes were skipped: the copy holds about the data, not 64 MiB.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap()) * 512;
    assert!(
        allocated <= 6 << 20,
        "{allocated} bytes allocated: holes were copied"
    );
}

#[test]
fn a_snapshot_the_cache_lost_is_exported_from_the_chunk_store() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (one, two) = make_volume_in(&data, true);
    let server = |args: &[&str]| {
        Command::new(bin())
            .arg("--data")
            .arg(&data)
            .args(args)
            .output()
            .unwrap()
    };
    // The cache is lost (or this is another server on the same store):
    // the image comes back from the store, the snapshot stays there.
    std::fs::remove_dir_all(data.join("volumes")).unwrap();
    let up = server(&["upgrade"]);
    assert!(up.status.success(), "{up:?}");
    assert!(std::fs::read(data.join("volumes/laptop/root/image")).unwrap() == two);
    let listed = server(&["snapshots", "laptop/root"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("first ") && l.contains("stored")),
        "{listed}"
    );
    let export = Export::start(&data, "laptop/root@first", port(), &[]);
    let out = dir.path().join("first.raw");
    copy(&export.url, &out);
    assert!(
        std::fs::read(&out).unwrap() == one,
        "the copy is not snapshot first"
    );
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap()) * 512;
    assert!(
        allocated <= 6 << 20,
        "{allocated} bytes allocated: holes were copied"
    );
    drop(export);
    // By a time too (to the second, as `snapshots` shows it): the newest
    // snapshot at or before it is the store's, though this cache has none.
    let listed = server(&["snapshots", "laptop/root", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let first_ms = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "first")
        .and_then(|s| s["epoch_ms"].as_u64())
        .unwrap_or_else(|| panic!("{listed}"));
    let when = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", first_ms / 1000),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .unwrap();
    let when = String::from_utf8(when.stdout).unwrap();
    let export = Export::start(&data, &format!("laptop/root@{}", when.trim()), port(), &[]);
    let by_time = dir.path().join("by-time.raw");
    copy(&export.url, &by_time);
    assert!(
        std::fs::read(&by_time).unwrap() == one,
        "the copy by time is not snapshot first"
    );
    drop(export);
    // And it can be deleted here: its pin goes from the store.
    let deleted = server(&["delete", "laptop/root@first"]);
    assert!(deleted.status.success(), "{deleted:?}");
    let listed = server(&["snapshots", "laptop/root"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains("first"), "{listed}");
    // Neither it, nor a name neither has, is exported.
    for name in ["first", "nothing"] {
        let refused = server(&[
            "export",
            &format!("laptop/root@{name}"),
            "--listen",
            &format!("127.0.0.1:{}", port()),
        ]);
        assert_eq!(refused.status.code(), Some(2), "{name}: {refused:?}");
    }
}

#[test]
fn a_writable_export_takes_writes_and_leaves_the_snapshot_untouched() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (one, _) = make_volume(&data);
    {
        let export = Export::start(&data, "laptop/root@first", port(), &["--writable"]);
        let io = Command::new("qemu-io")
            .args(["-f", "raw", &export.url])
            .args([
                "-c",
                "write -P 0xab 4096 65536",
                "-c",
                "read -P 0xab 4096 65536",
            ])
            .args([
                "-c",
                "discard 1048576 65536",
                "-c",
                "read -P 0 1048576 65536",
            ])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&io.stdout);
        assert!(
            io.status.success() && !out.contains("Pattern verification failed"),
            "{io:?}"
        );
    }
    // The overlay is gone with the export; the snapshot never changed.
    let export = Export::start(&data, "laptop/root@first", port(), &[]);
    let copy = dir.path().join("again.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &export.url])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{conv:?}");
    assert!(std::fs::read(&copy).unwrap() == one, "the snapshot changed");
    // A read-only export: qemu sees the write protection and refuses.
    let io = Command::new("qemu-io")
        .args(["-f", "raw", &export.url, "-c", "write -P 0xab 0 4096"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&io.stderr);
    assert!(
        !io.status.success() && said.contains("write protected"),
        "{io:?}"
    );
}

#[test]
fn only_allowed_initiators_get_in() {
    if !have("iscsi-inq") || !have("iscsi-ls") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_volume(&data);
    let p = port();
    let export = Export::start(
        &data,
        "laptop/root",
        p,
        &["--allow", "iqn.2026-11.test:good"],
    );
    let inq = |who: &str| {
        Command::new("iscsi-inq")
            .args(["-i", who, &export.url])
            .output()
            .unwrap()
    };
    assert!(inq("iqn.2026-11.test:good").status.success());
    let refused = inq("iqn.2026-11.test:bad");
    assert!(!refused.status.success(), "{refused:?}");
    // Discovery hides the target from others.
    let ls = |who: &str| {
        let o = Command::new("iscsi-ls")
            .args(["-i", who, &format!("iscsi://127.0.0.1:{p}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(ls("iqn.2026-11.test:good").contains("laptop.root.now"));
    assert!(!ls("iqn.2026-11.test:bad").contains("laptop.root"));
}

#[test]
fn chap_one_way_and_mutual() {
    if !have("iscsi-inq") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_volume(&data);
    let secret = dir.path().join("secret");
    let mutual = dir.path().join("mutual");
    std::fs::write(&secret, "abcdefghijkl12\n").unwrap();
    std::fs::write(&mutual, "mutualsecret99\n").unwrap();
    let with = |url: &str, creds: &str| url.replacen("iscsi://", &format!("iscsi://{creds}@"), 1);
    {
        let s = secret.to_str().unwrap();
        let export = Export::start(
            &data,
            "laptop/root",
            port(),
            &["--chap-user", "alice", "--chap-secret-file", s],
        );
        assert!(!inq(&export.url).0, "no credentials, and in");
        assert!(
            !inq(&with(&export.url, "alice%wrongwrongwrong")).0,
            "a wrong secret, and in"
        );
        assert!(
            !inq(&with(&export.url, "bob%abcdefghijkl12")).0,
            "a wrong user, and in"
        );
        let (ok, out) = inq(&with(&export.url, "alice%abcdefghijkl12"));
        assert!(ok && out.contains("UBLKMIRR"), "{out}");
    }
    let s = secret.to_str().unwrap();
    let m = mutual.to_str().unwrap();
    let export = Export::start(
        &data,
        "laptop/root",
        port(),
        &[
            "--chap-user",
            "alice",
            "--chap-secret-file",
            s,
            "--mutual-user",
            "tgt",
            "--mutual-secret-file",
            m,
        ],
    );
    let good = with(&export.url, "alice%abcdefghijkl12");
    assert!(
        inq(&format!(
            "{good}?target_user=tgt&target_password=mutualsecret99"
        ))
        .0
    );
    // The target cannot prove itself with the wrong secret: the initiator
    // refuses it.
    assert!(
        !inq(&format!(
            "{good}?target_user=tgt&target_password=notthesecret1"
        ))
        .0
    );
    // Set up to prove itself, the target wants to be asked.
    assert!(!inq(&good).0);
    // Too short a secret is refused before anything runs.
    std::fs::write(&secret, "short\n").unwrap();
    let out = Command::new(bin())
        .arg("--data")
        .arg(&data)
        .args([
            "export",
            "laptop/root",
            "--listen",
            "127.0.0.1:0",
            "--chap-user",
            "a",
            "--chap-secret-file",
            s,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("12 to 255 characters"),
        "{out:?}"
    );
}

/// `[[exports]]` in server.toml start with `mirror-server serve`: a
/// snapshot behind CHAP is served, one that cannot start (no such
/// snapshot) is logged and the server goes on, and `unexport` stops a
/// configured export like any other.
#[test]
fn exports_in_server_toml_start_with_the_server() {
    if !have("iscsi-inq") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_volume(&data);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "abcdefghijkl12\n").unwrap();
    let (good, bad) = (port(), port());
    let mut config = std::fs::read_to_string(data.join("server.toml")).unwrap();
    config.push_str(&format!(
        "\n[[exports]]\ntarget = \"laptop/root@first\"\nlisten = \"127.0.0.1:{good}\"\n\
         chap_user = \"alice\"\nchap_secret_file = {:?}\n\
         \n[[exports]]\ntarget = \"laptop/root@no-such-snapshot\"\nlisten = \"127.0.0.1:{bad}\"\n",
        secret.to_str().unwrap()
    ));
    std::fs::write(data.join("server.toml"), config).unwrap();
    let log = dir.path().join("serve.log");
    let mut serve = Command::new(bin())
        .arg("--data")
        .arg(&data)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let iqn = "iqn.2026-11.org.ublk-mirror:laptop.root.first";
    let url = format!("iscsi://127.0.0.1:{good}/{iqn}/0");
    let with_chap = format!("iscsi://alice%abcdefghijkl12@127.0.0.1:{good}/{iqn}/0");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !inq(&with_chap).0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the configured export never came up: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!inq(&url).0, "CHAP asked in server.toml, and in without it");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("exports[1]") && text.contains("did not start"),
        "{text}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", bad)).is_err());
    assert!(serve.try_wait().unwrap().is_none(), "the server stopped");
    let un = Command::new(bin())
        .arg("--data")
        .arg(&data)
        .args(["unexport", iqn])
        .output()
        .unwrap();
    assert!(un.status.success(), "{un:?}");
    assert!(!inq(&with_chap).0, "still served after unexport");
    let _ = serve.kill();
    let _ = serve.wait();
}
