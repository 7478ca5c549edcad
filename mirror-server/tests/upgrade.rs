//! A data directory written by the server before the chunk store (made by
//! commit 967748f's `mirror-server init`, `import` and `snapshot`; kept in
//! tests/fixtures without its identity) is upgraded: its volume becomes the
//! store's first version, nothing of it is lost, and the image can then be
//! made again from the store alone.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirror-server")
}

fn run(data: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

/// The image the fixture's volume was imported from: 16 blocks of 64 KiB,
/// blocks 2, 3 and 9 zeroes, block i otherwise sha256([i]) repeated.
fn imported() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0u8..16 {
        if [2, 3, 9].contains(&i) {
            out.extend(std::iter::repeat_n(0u8, 65536));
        } else {
            let d: [u8; 32] = Sha256::digest([i]).into();
            for _ in 0..2048 {
                out.extend_from_slice(&d);
            }
        }
    }
    out
}

fn state_json(data: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data.join("volumes/laptop/root/state.json")).unwrap())
        .unwrap()
}

#[test]
fn a_data_directory_from_before_the_chunk_store_is_upgraded_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data-dir-before-chunk-store.tar.gz");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(untar.status.success(), "{untar:?}");
    let data = dir.path().join("data");
    let toml = std::fs::read_to_string(data.join("server.toml")).unwrap();
    assert!(!toml.contains("[store]"), "the fixture predates the store");

    let up = run(&data, &["upgrade"]);
    assert!(up.status.success(), "{up:?}");
    let said = String::from_utf8_lossy(&up.stdout);
    assert!(
        said.contains("laptop/root: version 1 in the store (epoch 1)"),
        "{said}"
    );
    let state = std::fs::read_to_string(data.join("volumes/laptop/root/state.json")).unwrap();
    assert!(state.contains("\"store_seq\": 1"), "{state}");

    let store = run(&data, &["store", "--json"]);
    assert!(store.status.success(), "{store:?}");
    let store: serde_json::Value = serde_json::from_slice(&store.stdout).unwrap();
    // 13 blocks of data, all different; the holes cost nothing.
    assert_eq!(store["chunks"], 13, "{store}");
    assert_eq!(store["raw_bytes"], 13 * 65536);
    assert_eq!(store["volumes"][0]["volume"], "laptop/root");
    assert_eq!(store["volumes"][0]["epoch"], 1);

    // The old snapshot is still there, and a second upgrade changes
    // nothing.
    let snaps = run(&data, &["snapshots", "laptop/root"]);
    assert!(
        String::from_utf8_lossy(&snaps.stdout).contains("before-upgrade"),
        "{snaps:?}"
    );
    let again = run(&data, &["upgrade"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("laptop/root: version 1 in the store"),
        "{again:?}"
    );
    let store2 = run(&data, &["store", "--json"]);
    let store2: serde_json::Value = serde_json::from_slice(&store2.stdout).unwrap();
    assert_eq!(store2["volumes"][0]["versions"], 1, "{store2}");

    // [store] pointed at another, empty store (a typo, a mount missing):
    // the volume is not stored there as if new; on purpose it is.
    let stored_in = state_json(&data)["store_id"].as_str().unwrap().to_string();
    let toml = std::fs::read_to_string(data.join("server.toml")).unwrap();
    std::fs::write(
        data.join("server.toml"),
        format!("{toml}\n[store]\nurl = \"other-store\"\n"),
    )
    .unwrap();
    let wrong = run(&data, &["upgrade"]);
    assert!(!wrong.status.success(), "{wrong:?}");
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("is kept in the chunk store"), "{said}");
    assert!(said.contains("--move-to-this-store"), "{said}");
    let store3 = run(&data, &["store", "--json"]);
    let store3: serde_json::Value = serde_json::from_slice(&store3.stdout).unwrap();
    assert_eq!(store3["chunks"], 0, "stored in the wrong store: {store3}");
    let moved = run(&data, &["upgrade", "--move-to-this-store"]);
    assert!(moved.status.success(), "{moved:?}");
    assert!(
        String::from_utf8_lossy(&moved.stdout).contains("laptop/root: version 1 in the store"),
        "{moved:?}"
    );
    let now_in = state_json(&data)["store_id"].as_str().unwrap().to_string();
    assert_ne!(now_in, stored_in, "the state names the new store");
    // Again: nothing to move, and no failure.
    let again = run(&data, &["upgrade", "--move-to-this-store"]);
    assert!(again.status.success(), "{again:?}");
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("to be kept in this store"),
        "{again:?}"
    );
    // Back to the first store: its id is not the one the state names.
    std::fs::write(data.join("server.toml"), &toml).unwrap();
    let back = run(&data, &["upgrade"]);
    assert!(!back.status.success(), "{back:?}");
    assert!(
        String::from_utf8_lossy(&back.stderr).contains("is kept in the chunk store"),
        "{back:?}"
    );
    std::fs::write(
        data.join("server.toml"),
        format!("{toml}\n[store]\nurl = \"other-store\"\n"),
    )
    .unwrap();

    // The images are now a cache: made again from the store alone.
    std::fs::remove_dir_all(data.join("volumes")).unwrap();
    let rebuilt = run(&data, &["upgrade"]);
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    let image = std::fs::read(data.join("volumes/laptop/root/image")).unwrap();
    assert!(image == imported(), "the rebuilt image differs");
}
