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
    // No server runs: nothing is exported, and it says why.
    let exports = server(&data, &["exports", "--json"]);
    assert!(exports.status.success(), "{exports:?}");
    assert_eq!(String::from_utf8_lossy(&exports.stdout).trim(), "[]");
    assert!(
        String::from_utf8_lossy(&exports.stderr).contains("no server runs"),
        "{exports:?}"
    );

    mirror_server::store::Volume::create(&data.join("volumes/laptop/root"), 1 << 30).unwrap();
    let listed = server(&data, &["volumes"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("laptop/root"), "{text}");
    assert!(text.contains("1GiB"), "{text}");
    assert!(text.contains("never"), "{text}");

    // A new client's or snapshot's name that commands would read as an
    // option is refused, before anything is made.
    for args in [
        &["client", "add", "--address", "127.0.0.1:7000", "--", "-x"][..],
        &["snapshot", "laptop/root", "--", "-x"],
    ] {
        let out = server(&data, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("may not start with '-'"),
            "{args:?}: {out:?}"
        );
    }
    assert!(!data.join("clients/-x.json").exists());
}

#[test]
fn a_missing_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let nothing = dir.path().join("nothing");
    for args in [
        &["volumes"][..],
        &["client", "list"],
        &["client", "revoke", "x"],
    ] {
        let out = server(&nothing, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("mirror-server init --data"), "{args:?}: {err}");
    }
    assert!(!nothing.exists(), "a mistyped --data was made");
}

/// `client list --json` shows what a listing needs: a pending token's
/// expiry, never its hash.
#[test]
fn the_client_list_shows_each_client_s_state_and_no_token_hash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(server(&data, &["init", "--listen", "127.0.0.1:7000"])
        .status
        .success());
    let add = server(
        &data,
        &["client", "add", "laptop", "--address", "127.0.0.1:7000"],
    );
    assert!(add.status.success(), "{add:?}");
    let out = server(&data, &["client", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("secret"), "{text}");
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list[0]["name"], "laptop", "{list}");
    assert_eq!(list[0]["state"], "pending", "{list}");
    assert!(list[0]["token_expires_ms"].as_u64().unwrap() > 0, "{list}");
}

#[test]
fn volumes_flags_the_stale_ones_for_cron_and_reads_the_store_too() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(server(&data, &["init"]).status.success());
    let img = dir.path().join("img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let out = server(
        &data,
        &["import", "test/fresh", "--from", img.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    mirror_server::store::Volume::create(&data.join("volumes/laptop/never"), 1 << 20).unwrap();

    // Published a moment ago: not stale within an hour; never published:
    // stale. Any stale volume: exit status 1, for cron.
    let out = server(&data, &["volumes", "--stale", "1h"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| text.lines().find(|l| l.contains(name)).unwrap().to_string();
    assert!(line("laptop/never").contains("STALE"), "{text}");
    assert!(!line("test/fresh").contains("STALE"), "{text}");
    assert!(line("test/fresh").contains("s ago"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 volumes have published nothing for 1h")
    );
    let out = server(&data, &["volumes", "--stale", "1h", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["volume"], "laptop/never");
    assert_eq!(rows[0]["stale"], true);
    assert_eq!(rows[1]["stale"], false);
    assert!(rows[1]["age_seconds"].as_u64().unwrap() < 600, "{rows}");
    // Without --stale nothing is judged.
    assert!(server(&data, &["volumes"]).status.success());
    std::fs::remove_dir_all(data.join("volumes/laptop")).unwrap();
    assert!(server(&data, &["volumes", "--stale", "1h"])
        .status
        .success());

    // A volume this server's cache lacks (another server serves it) is
    // listed from the chunk store with --store.
    std::fs::remove_dir_all(data.join("volumes/test")).unwrap();
    let out = server(&data, &["volumes", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = server(&data, &["volumes", "--json", "--store", "--stale", "1d"]);
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["volume"], "test/fresh");
    assert_eq!(rows[0]["only_in_store"], true);
    assert_eq!(rows[0]["size"], 1 << 20);
    assert_eq!(rows[0]["stale"], false);
    // Imported again under that name: refused, the store's versions
    // would replace it when first opened.
    let out = server(
        &data,
        &["import", "test/fresh", "--from", img.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds volume test/fresh already"),
        "{out:?}"
    );
    assert!(!data.join("volumes/test/fresh").exists());
    // A bad threshold is a usage error.
    assert_eq!(
        server(&data, &["volumes", "--stale", "soon"]).status.code(),
        Some(2)
    );
}

#[test]
fn snapshot_times_show_in_the_local_time_zone_or_utc() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(server(&data, &["init"]).status.success());
    let img = dir.path().join("img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    assert!(server(
        &data,
        &["import", "test/v", "--from", img.to_str().unwrap()]
    )
    .status
    .success());
    assert!(server(&data, &["snapshot", "test/v", "first"])
        .status
        .success());
    let list = |tz: &str, extra: &[&str]| {
        let mut args = vec!["--data", data.to_str().unwrap(), "snapshots", "test/v"];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_mirror-server"))
            .env("TZ", tz)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let tokyo = list("Asia/Tokyo", &[]);
    assert!(tokyo.contains("first") && tokyo.contains(" JST"), "{tokyo}");
    let utc = list("Asia/Tokyo", &["--utc"]);
    assert!(utc.contains(" UTC") && !utc.contains("JST"), "{utc}");
}

#[test]
fn a_server_toml_it_cannot_use_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(server(&data, &["init"]).status.success());
    let cfg = data.join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\nlisten_typo = 1\n")).unwrap();
    let out = server(&data, &["serve"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_typo"), "{err}");
    // (The systemd unit does not restart on this status: common/tests/units.rs.)
}
