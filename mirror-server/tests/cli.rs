//! The `mirror-server` command line, run as a user would.

use std::process::Command;

fn server(data: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mirror-server"))
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_makes_an_identity_once_and_volumes_lists_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = server(&data, &["init", "--listen", "127.0.0.1:7000"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fingerprint: sha256:"), "{text}");
    assert!(text.contains("127.0.0.1:7000"), "{text}");
    let config = std::fs::read_to_string(data.join("server.toml")).unwrap();
    assert!(config.contains("listen = \"127.0.0.1:7000\""), "{config}");

    // A second init would change the identity clients pinned: refused.
    let again = server(&data, &["init"]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("never replaced"));

    let empty = server(&data, &["volumes", "--json"]);
    assert!(empty.status.success(), "{empty:?}");
    assert_eq!(String::from_utf8_lossy(&empty.stdout).trim(), "[]");

    mirror_server::store::Volume::create(&data.join("volumes/laptop/root"), 1 << 30).unwrap();
    let listed = server(&data, &["volumes"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("laptop/root"), "{text}");
    assert!(text.contains("1GiB"), "{text}");
    assert!(text.contains("never"), "{text}");
}

#[test]
fn a_missing_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = server(&dir.path().join("nothing"), &["volumes"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mirror-server init --data"), "{err}");
}
