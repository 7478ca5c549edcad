//! `ublk-mirror enroll` against a mirror server running in this process
//! (the server's own code, on 127.0.0.1).

use std::path::Path;
use std::process::Command;

use mirror_server::clients::Registry;
use ublk_mirror_common::identity::Identity;

use crate::support::TestServer;

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
    let server = TestServer::start(&data, "127.0.0.1:0");
    let token = server.token(&data, "laptop");
    let registry = Registry::open(&data).unwrap();
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

    // A used token fails on another machine too: the server refused
    // (exit status 6, not a local failure).
    let other = enroll(&token.to_string(), &dir.path().join("other"));
    assert_eq!(other.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&other.stderr).contains("refused"));

    // A token whose address reaches another server (or one whose
    // identity was made anew): refused, saying so, nothing saved.
    let mut elsewhere = server.token(&data, "desk");
    elsewhere.server = Identity::create(&dir.path().join("someone"))
        .unwrap()
        .fingerprint();
    let fourth = dir.path().join("fourth");
    let out = enroll(&elsewhere.to_string(), &fourth);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the one that made this token"), "{err}");
    assert!(!err.contains("changed"), "{err}");
    assert!(ublk_dev::enrollment::Enrollment::load(&fourth).is_err());

    // Not a token at all.
    let bad = enroll("hello", &dir.path().join("third"));
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an enrollment token"));
}
