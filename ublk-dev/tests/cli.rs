//! The `ublk-mirror` command line where no kernel driver is needed: bad
//! input is refused with a clear message and changes nothing.

use std::path::Path;
use std::process::{Command, Output};

fn ublk_mirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ublk-mirror")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn driver_loaded() -> bool {
    Path::new("/dev/ublk-control").exists()
}

#[test]
fn help_teaches_with_examples() {
    let o = ublk_mirror(&["add", "--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "--backing",
        "--size",
        "--logical-block-size",
        "Examples:",
        "--config",
    ] {
        assert!(text.contains(want), "add --help lacks {want}:\n{text}");
    }
    let o = ublk_mirror(&["attach", "--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "--at",
        "--writable",
        "--cache",
        "--timeout",
        "--background",
        "detach",
    ] {
        assert!(text.contains(want), "attach --help lacks {want}:\n{text}");
    }
}

#[test]
fn attach_refuses_a_bad_volume_name_before_anything() {
    let o = ublk_mirror(&["attach", "--volume", "../x"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("../x") || err.contains("name"), "{err}");
    let o = ublk_mirror(&["detach", "sda"]);
    assert!(!o.status.success());
}

#[test]
fn out_of_range_values_are_refused_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let img = img.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--size", "64M", "--queues", "0"],
            "--queues 0 is out of range",
        ),
        (
            &["--size", "64M", "--depth", "5000"],
            "--depth 5000 is out of range",
        ),
        (
            &["--size", "64M", "--logical-block-size", "1000"],
            "512 or 4096",
        ),
        (
            &["--size", "1000"],
            "not a multiple of the logical block size",
        ),
        (&["--size", "ten"], "invalid size"),
        (
            &["--size", "64M", "--name", "no spaces"],
            "invalid device name",
        ),
        (
            &["--size", "64M", "--id", "99999999"],
            "--id 99999999 is out of range",
        ),
        (
            &[
                "--size",
                "64M",
                "--mirror",
                "root",
                "--mirror-min-rate",
                "1K",
            ],
            "--mirror-min-rate 1KiB is below 256KiB a second",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["add", "--backing", img];
        args.extend_from_slice(extra);
        let o = ublk_mirror(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(
            !Path::new(img).exists(),
            "{args:?} created the backing file"
        );
    }
}

/// Asking the mirror before this machine is enrolled says how to enroll
/// (exit 3: the environment), and makes nothing.
#[test]
fn a_machine_not_enrolled_is_told_how_to_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let client = dir.path().join("client");
    let to = dir.path().join("r.img");
    let (client_s, to_s) = (client.to_str().unwrap(), to.to_str().unwrap());
    for args in [
        &["snapshots", "--volume", "root", "--client-dir", client_s][..],
        &[
            "restore",
            "--volume",
            "root",
            "--to",
            to_s,
            "--client-dir",
            client_s,
        ],
    ] {
        let o = ublk_mirror(args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("not enrolled") && stderr(&o).contains("ublk-mirror enroll TOKEN"),
            "{}",
            stderr(&o)
        );
    }
    assert!(!client.exists() && !to.exists());
}

#[test]
fn a_missing_backing_file_needs_a_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("missing.img");
    let o = ublk_mirror(&["add", "--backing", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not exist; give --size"),
        "{}",
        stderr(&o)
    );
    assert!(!img.exists());
}

#[test]
fn a_size_mismatch_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![1u8; 8192]).unwrap();
    let o = ublk_mirror(&["add", "--backing", img.to_str().unwrap(), "--size", "4K"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is 8192 bytes but the device size is 4096 bytes"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&img).unwrap(), vec![1u8; 8192]);
}

#[test]
fn a_bad_config_file_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("laptop.toml");
    std::fs::write(&cfg, "backing = \"d.img\"\nsize = \"64M\"\nqueue = 2\n").unwrap();
    let o = ublk_mirror(&["add", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown field `queue`"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("d.img").exists());
    // (The systemd unit does not restart on this status: common/tests/units.rs.)
}

/// Without the driver, `add` explains how to load it and leaves no file behind.
#[test]
fn no_driver_says_how_to_load_it() {
    if driver_loaded() {
        eprintln!("skipped: this kernel has ublk_drv loaded; the VM suite covers add");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("new.img");
    let o = ublk_mirror(&["add", "--backing", img.to_str().unwrap(), "--size", "64M"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("modprobe ublk_drv"), "{}", stderr(&o));
    assert!(
        !img.exists(),
        "the backing file created for the device was left behind"
    );
    let o = ublk_mirror(&["list"]);
    assert!(stderr(&o).contains("modprobe ublk_drv"), "{}", stderr(&o));
}
