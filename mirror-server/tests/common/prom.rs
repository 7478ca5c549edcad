//! Metrics read as Prometheus reads them: Python's prometheus_client
//! parser (scripts/deps installs it in /var/cache/ublk-mirror/pytools).
//! Shared by the server's and the device's tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// One sample: its name, labels (a JSON object) and value.
pub type Sample = (String, serde_json::Value, f64);

/// Every sample of the text exposition `text`; the parser refusing it
/// fails the test.
pub fn parse(text: &str) -> Vec<Sample> {
    let python = "/var/cache/ublk-mirror/pytools/bin/python3";
    assert!(
        Path::new(python).exists(),
        "{python} is missing: run scripts/deps (it installs prometheus-client)"
    );
    let mut parse = Command::new(python)
        .args([
            "-c",
            "import sys, json\n\
             from prometheus_client.parser import text_string_to_metric_families as parse\n\
             print(json.dumps([[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) for s in f.samples]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    parse
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = parse.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the metrics:\n{text}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of sample `name` whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .unwrap_or_else(|| panic!("no {name} {labels:?} in {samples:?}"))
        .2
}
