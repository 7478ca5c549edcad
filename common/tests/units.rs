//! The systemd units of both daemons, against what the daemons do.

/// Exit status 2 is a config the daemon cannot use (both crates' usage
/// errors; their CLI tests check a bad config gets it): the units fail at
/// once on it, with the reason in `systemctl status`, instead of starting
/// the same config again every 2 s.
#[test]
fn the_units_do_not_restart_on_a_config_they_cannot_use() {
    for unit in ["ublk-mirror@.service", "mirror-server.service"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../systemd")
            .join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().any(|l| l
                .strip_prefix("RestartPreventExitStatus=")
                .is_some_and(|v| v.split_whitespace().any(|c| c == "2"))),
            "{unit} restarts on a config it cannot use"
        );
    }
}
