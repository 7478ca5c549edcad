//! The devices' metrics in Prometheus' text format, made from the status
//! each daemon publishes ([`crate::status`]): `ublk-mirror metrics`
//! prints them, or writes them for node_exporter's textfile collector
//! (`--textfile`, atomically; `systemd/ublk-mirror-metrics.timer` runs it
//! every 15 s).
//!
//! Names: a `ublk_mirror_` prefix, units in the names, `_total` for
//! counters; labels `device` (`ublkb0`) and `name`. A daemon that died
//! leaves its last status: `ublk_mirror_status_updated_timestamp_seconds`
//! stops moving, which an alert can see.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::status::DeviceStatus;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// One device: its node (`ublkb0`), its name, and its status if published.
#[derive(Debug, Clone)]
pub struct Device {
    /// `ublkbN`.
    pub device: String,
    /// The name it was added with.
    pub name: String,
    /// What its daemon last published.
    pub status: Option<DeviceStatus>,
}

fn gauges(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f.clone()),
        None => r.register(name, help, f.clone()),
    }
    f
}

fn counters(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f.clone()),
        None => r.register(name, help, f.clone()),
    }
    f
}

/// The text exposition of `devices`.
pub fn render(devices: &[Device]) -> String {
    let mut r = Registry::default();
    // One series for every device, whatever its status: a device whose
    // daemon published none (it failed before, or a newer format) would
    // otherwise vanish, and no alert on its status could fire.
    let readable = gauges(
        &mut r,
        "ublk_mirror_status_readable",
        "1 if the device's daemon published a status this version reads, else 0",
        None,
    );
    let updated = Family::<Labels, FloatGauge>::default();
    r.register_with_unit(
        "ublk_mirror_status_updated_timestamp",
        "When the device's daemon last published its status (Unix time)",
        Unit::Seconds,
        updated.clone(),
    );
    let requests = counters(
        &mut r,
        "ublk_mirror_requests",
        "Requests served, by op",
        None,
    );
    let errors = counters(
        &mut r,
        "ublk_mirror_request_errors",
        "Requests failed",
        None,
    );
    let dirty = gauges(
        &mut r,
        "ublk_mirror_dirty",
        "Bytes written since the last release",
        Some(Unit::Bytes),
    );
    let zeroed = gauges(
        &mut r,
        "ublk_mirror_zeroed",
        "Bytes discarded or zeroed since the last release",
        Some(Unit::Bytes),
    );
    let resync = gauges(
        &mut r,
        "ublk_mirror_resync",
        "Bytes left to settle with the mirror by hash",
        Some(Unit::Bytes),
    );
    let regions = gauges(
        &mut r,
        "ublk_mirror_regions_marked",
        "Journal regions marked",
        None,
    );
    let epoch = gauges(&mut r, "ublk_mirror_current_epoch", "The open epoch", None);
    let cow = gauges(
        &mut r,
        "ublk_mirror_cow_memory",
        "Memory holding copy-on-write chunks of sealed epochs",
        Some(Unit::Bytes),
    );
    let spill = gauges(
        &mut r,
        "ublk_mirror_cow_spilled",
        "Copy-on-write chunks spilled to a file",
        Some(Unit::Bytes),
    );
    let syncs = counters(
        &mut r,
        "ublk_mirror_journal_syncs",
        "Journal syncs made to mark regions",
        None,
    );
    let cow_waits = counters(
        &mut r,
        "ublk_mirror_cow_waits",
        "Times a write was held back until the chunks it overwrites were preserved for a sealed epoch",
        None,
    );
    let up = gauges(
        &mut r,
        "ublk_mirror_link_up",
        "1 while connected to the mirror server",
        None,
    );
    let lag = Family::<Labels, FloatGauge>::default();
    r.register_with_unit(
        "ublk_mirror_lag",
        "Age of the oldest change not yet on the mirror (0: none)",
        Unit::Seconds,
        lag.clone(),
    );
    let behind = gauges(
        &mut r,
        "ublk_mirror_behind",
        "Bytes changed and not yet on the mirror",
        Some(Unit::Bytes),
    );
    let sending = gauges(
        &mut r,
        "ublk_mirror_sending",
        "Bytes of the epoch or first-sync round being sent now (0: none)",
        Some(Unit::Bytes),
    );
    let sending_done = gauges(
        &mut r,
        "ublk_mirror_sending_done",
        "Bytes of the epoch or first-sync round being sent that have gone",
        Some(Unit::Bytes),
    );
    let server_epoch = gauges(
        &mut r,
        "ublk_mirror_server_epoch",
        "The epoch the mirror holds",
        None,
    );
    let shipped = counters(
        &mut r,
        "ublk_mirror_epochs_shipped",
        "Epochs this daemon mirrored",
        None,
    );
    let wire = counters(
        &mut r,
        "ublk_mirror_sent_wire",
        "Bytes of blocks sent (after compression)",
        Some(Unit::Bytes),
    );
    let known = counters(
        &mut r,
        "ublk_mirror_deduplicated_wire",
        "Bytes the server held already (sent as digests)",
        Some(Unit::Bytes),
    );
    let yielding = gauges(
        &mut r,
        "ublk_mirror_precopy_yielding",
        "1 while a first sync or resync reads at the minimum rate, the device being busy",
        None,
    );
    let yielded = Family::<Labels, Counter<f64, AtomicU64>>::default();
    r.register_with_unit(
        "ublk_mirror_precopy_yielded",
        "Time of first sync or resync reading held to the minimum rate for the device's own I/O",
        Unit::Seconds,
        yielded.clone(),
    );
    let let_go = counters(
        &mut r,
        "ublk_mirror_cuts_let_go",
        "Sealed epochs that let go of their cuts while the mirror was out of reach",
        None,
    );
    let failures = counters(
        &mut r,
        "ublk_mirror_failures",
        "Times mirroring failed and was tried again (the link lost, the server refused)",
        None,
    );
    let fetched = counters(
        &mut r,
        "ublk_mirror_attach_fetched",
        "Bytes an attached version or instant restore fetched from the mirror",
        Some(Unit::Bytes),
    );
    let remaining = gauges(
        &mut r,
        "ublk_mirror_attach_remaining",
        "Bytes of an attached version or instant restore not held locally",
        Some(Unit::Bytes),
    );
    let waiting = gauges(
        &mut r,
        "ublk_mirror_attach_waiting_requests",
        "Requests waiting for blocks from the mirror",
        None,
    );
    let timed_out = counters(
        &mut r,
        "ublk_mirror_attach_timed_out_requests",
        "Requests failed because the mirror was out of reach past the timeout",
        None,
    );
    for d in devices {
        let l: Labels = vec![
            ("device".into(), d.device.clone()),
            ("name".into(), d.name.clone()),
        ];
        readable
            .get_or_create(&l)
            .set(i64::from(d.status.is_some()));
        let Some(s) = &d.status else { continue };
        let with_op = |op: &str| {
            let mut l = l.clone();
            l.push(("op".into(), op.into()));
            l
        };
        updated.get_or_create(&l).set(s.updated_ms as f64 / 1000.0);
        requests.get_or_create(&with_op("read")).inc_by(s.reads);
        requests.get_or_create(&with_op("write")).inc_by(s.writes);
        errors.get_or_create(&l).inc_by(s.errors);
        if let Some(t) = &s.tracking {
            dirty.get_or_create(&l).set(t.dirty_bytes as i64);
            zeroed.get_or_create(&l).set(t.zeroed_bytes as i64);
            resync.get_or_create(&l).set(t.resync_bytes as i64);
            regions.get_or_create(&l).set(t.regions_marked as i64);
            epoch.get_or_create(&l).set(t.current_epoch as i64);
            cow.get_or_create(&l).set(t.preserved_memory_bytes as i64);
            spill
                .get_or_create(&l)
                .set(t.preserved_spilled_bytes as i64);
            syncs.get_or_create(&l).inc_by(t.journal_syncs);
            cow_waits.get_or_create(&l).inc_by(t.cow_waits);
        }
        if let Some(m) = &s.mirror {
            up.get_or_create(&l).set(i64::from(m.link == "connected"));
            lag.get_or_create(&l).set(m.lag_ms as f64 / 1000.0);
            behind.get_or_create(&l).set(m.bytes_behind as i64);
            sending.get_or_create(&l).set(m.sending_bytes as i64);
            sending_done
                .get_or_create(&l)
                .set(m.sending_done.min(m.sending_bytes) as i64);
            server_epoch.get_or_create(&l).set(m.server_epoch as i64);
            shipped.get_or_create(&l).inc_by(m.epochs_shipped);
            wire.get_or_create(&l).inc_by(m.wire_bytes_total);
            known.get_or_create(&l).inc_by(m.known_bytes);
            yielding.get_or_create(&l).set(i64::from(m.yielding));
            let_go.get_or_create(&l).inc_by(m.cuts_let_go);
            failures.get_or_create(&l).inc_by(m.failures);
            yielded
                .get_or_create(&l)
                .inc_by(m.yielded_ms as f64 / 1000.0);
        }
        if let Some(a) = &s.attach {
            up.get_or_create(&l).set(i64::from(a.link_up));
            fetched.get_or_create(&l).inc_by(a.fetched_bytes);
            remaining.get_or_create(&l).set(a.remaining_bytes as i64);
            waiting.get_or_create(&l).set(a.waiting as i64);
            timed_out.get_or_create(&l).inc_by(a.timed_out);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    // node_exporter's textfile collector reads text format 0.0.4.
    ublk_mirror_common::exposition::classic(&out)
}

/// Write `text` to `path` atomically (a temporary file renamed over it),
/// as node_exporter's textfile collector wants.
pub fn write_textfile(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_a_readable_status_still_has_a_series() {
        let text = render(&[Device {
            device: "ublkb3".into(),
            name: "home".into(),
            status: None,
        }]);
        assert!(
            text.contains("ublk_mirror_status_readable{device=\"ublkb3\",name=\"home\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ublk_mirror_status_readable gauge"),
            "{text}"
        );
        assert!(
            !text.contains("ublk_mirror_status_updated_timestamp_seconds{"),
            "{text}"
        );
    }
}
