//! `ublk-mirror enroll` against a mirror server running in this process
//! (the server's own code, on 127.0.0.1).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mirror_server::clients::Registry;
use mirror_server::config::ServerConfig;
use ublk_mirror_common::identity::Identity;
use ublk_mirror_common::token::Token;

/// Start a server on 127.0.0.1 in a thread; returns its address and a
/// sender that stops it.
fn start_server(data: &Path) -> (String, tokio::sync::oneshot::Sender<()>) {
    Identity::create(&data.join("identity")).unwrap();
    std::fs::create_dir_all(data.join("volumes")).unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let data = data.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(mirror_server::serve::run(
            &data,
            &config,
            |addr| addr_tx.send(addr.to_string()).unwrap(),
            async {
                let _ = stopped.await;
            },
        ))
        .unwrap();
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    (addr, stop)
}

fn enroll(token: &str, client_dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args(["enroll", token, "--client-dir"])
        .arg(client_dir)
        .output()
        .unwrap()
}

#[test]
fn a_token_enrolls_this_machine_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let (address, stop) = start_server(&data);
    let registry = Registry::open(&data).unwrap();
    let secret = registry.add("laptop", Duration::from_secs(60)).unwrap();
    let token = Token {
        name: "laptop".into(),
        secret,
        server: Identity::load(&data.join("identity"))
            .unwrap()
            .fingerprint(),
        address,
    };
    let client_dir = dir.path().join("client");

    let out = enroll(&token.to_string(), &client_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("enrolled as laptop"));
    let me = Identity::load(&client_dir).unwrap();
    assert_eq!(
        registry.who(me.fingerprint()).unwrap().as_deref(),
        Some("laptop"),
        "the server did not record this machine's certificate"
    );
    let saved = ublk_dev::enrollment::Enrollment::load(&client_dir).unwrap();
    assert_eq!(saved.server().unwrap(), token.server);

    // Enrolled already: refused, nothing changed.
    let again = enroll(&token.to_string(), &client_dir);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("enrolled already"));

    // A used token fails on another machine too.
    let other = enroll(&token.to_string(), &dir.path().join("other"));
    assert_ne!(other.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&other.stderr).contains("refused"));

    // Not a token at all.
    let bad = enroll("hello", &dir.path().join("third"));
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an enrollment token"));
    let _ = stop.send(());
}
