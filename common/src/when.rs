//! Times as people write them, in their own time zone (`jiff`): what
//! `--at` takes on both command lines, and how times are shown.
//!
//! `--at` is a snapshot's name or a time. A time is one of:
//! - `now`, `today`, `yesterday`, optionally with a time of day:
//!   `yesterday 18:00`, `today 9:30`;
//! - a span ago: `2h ago`, `3 days ago`, `90m ago`;
//! - a local date or date and time: `2026-12-02`, `2026-12-02 18:00`,
//!   `2026-12-02T18:00:05`;
//! - an instant: `2026-12-02T17:00:00Z`, `2026-12-02T18:00+01:00`;
//! - a date and time with a zone, as times are shown
//!   (`2026-12-02 18:00:05 CET`, `… UTC`) or an offset (`… +01:00`): a
//!   zone's abbreviation is read only where it is this machine's zone
//!   then (or UTC); another is refused, asking for UTC or an offset.
//!
//! A bare time of day (`18:00`) is refused, asking for its day; so is
//! anything else with a colon or a space (no name has one).
//!
//! Local means the time zone of the machine the command runs on (`TZ`,
//! else `/etc/localtime`). The client turns a time into an instant before
//! it asks ([`resolve_at`]), so the server's time zone never matters: on
//! the wire a time is always UTC, `YYYY-MM-DDTHH:MM:SSZ`.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, Zoned};

use crate::Error;

fn invalid(input: &str, reason: impl std::fmt::Display) -> Error {
    Error::InvalidTime {
        input: input.to_string(),
        reason: reason.to_string(),
    }
}

/// The instant `text` names, as of `now` (its time zone is the local
/// one); `Ok(None)` when `text` is not written as a time (a snapshot's
/// name), an error when it is but is not a valid one.
pub fn parse_at(text: &str, now: &Zoned) -> Result<Option<Timestamp>, Error> {
    let t = text.trim();
    if t.is_empty() {
        return Err(invalid(
            text,
            "it is empty: give a snapshot's name or a time",
        ));
    }
    let lower = t.to_ascii_lowercase();
    let tz = now.time_zone();
    let at_local = |dt: DateTime| {
        dt.to_zoned(tz.clone())
            .map(|z| Some(z.timestamp()))
            .map_err(|e| invalid(text, e))
    };
    // "now", "today [TIME]", "yesterday [TIME]".
    let mut words = lower.split_whitespace();
    let first = words.next().unwrap_or_default();
    let day = match first {
        "now" if words.next().is_none() => return Ok(Some(now.timestamp())),
        "today" => Some(now.date()),
        "yesterday" => Some(now.date().yesterday().map_err(|e| invalid(text, e))?),
        _ => None,
    };
    if let Some(day) = day {
        let rest: Vec<&str> = words.collect();
        let time = match rest.as_slice() {
            [] => Time::midnight(),
            [hm] => parse_time_of_day(hm)
                .ok_or_else(|| invalid(text, "the time of day should be HH:MM or HH:MM:SS"))?,
            _ => return Err(invalid(text, "expected e.g. `yesterday 18:00`")),
        };
        return at_local(day.to_datetime(time));
    }
    // "2h ago", "3 days ago".
    if let Some(span) = lower.strip_suffix("ago") {
        let parsed = span.trim().parse::<Span>();
        // `chicago` is a name; `2h ago` and `2hago` are times.
        if parsed.is_err() && !span.ends_with(char::is_whitespace) {
            return Ok(None);
        }
        let span: Span =
            parsed.map_err(|e| invalid(text, format!("expected e.g. `2h ago` ({e})")))?;
        return now
            .checked_sub(span)
            .map(|z| Some(z.timestamp()))
            .map_err(|e| invalid(text, e));
    }
    // Starts like a date: an instant (with Z or an offset), or local.
    let looks_like_date = t.len() >= 10
        && t.as_bytes()[4] == b'-'
        && t.as_bytes()[7] == b'-'
        && t.as_bytes()[..4].iter().all(u8::is_ascii_digit);
    if !looks_like_date {
        // No name has a colon or a space: a time this does not read.
        if parse_time_of_day(t).is_some() {
            return Err(invalid(
                text,
                format!("a time of day needs its day: `today {t}` or `yesterday {t}`"),
            ));
        }
        if t.contains(':') || t.contains(char::is_whitespace) {
            return Err(invalid(text, FORMS));
        }
        return Ok(None);
    }
    // A snapshot's own name (`2026-11-22T16.30.05Z`) is a name; with a
    // colon or a space (no name has either) the dot is a second's
    // fraction (`2026-12-07T21:14:33.27+00:00`, as Python writes it).
    if t.contains('.') && !t.contains(':') && !t.contains(char::is_whitespace) {
        return Ok(None);
    }
    if let Ok(ts) = t.parse::<Timestamp>() {
        return Ok(Some(ts));
    }
    // A zone after a date and time, as `snapshots` shows times
    // (`2026-12-02 18:00:05 CET`), or an offset (`… +01:00`).
    if let Some((civil, zone)) = t.rsplit_once(' ').filter(|(c, _)| c.contains([' ', 'T'])) {
        let dt = civil
            .replacen(' ', "T", 1)
            .parse::<DateTime>()
            .map_err(|e| invalid(text, e))?;
        if zone.starts_with(['+', '-']) {
            let instant = format!("{dt}{zone}");
            return instant
                .parse::<Timestamp>()
                .map(Some)
                .map_err(|e| invalid(text, format!("the offset should be like +01:00 ({e})")));
        }
        let upper = zone.to_ascii_uppercase();
        if matches!(upper.as_str(), "UTC" | "GMT" | "Z") {
            return dt
                .to_zoned(TimeZone::UTC)
                .map(|z| Some(z.timestamp()))
                .map_err(|e| invalid(text, e));
        }
        // In the hour a clock turns back, the zone tells which of the
        // two times it is (`02:30 CEST`, then `02:30 CET`).
        let ambiguous = tz.to_ambiguous_zoned(dt);
        for z in [ambiguous.clone().earlier(), ambiguous.later()]
            .into_iter()
            .flatten()
        {
            if z.strftime("%Z").to_string().eq_ignore_ascii_case(zone) {
                return Ok(Some(z.timestamp()));
            }
        }
        let local = dt.to_zoned(tz.clone()).map_err(|e| invalid(text, e))?;
        return Err(invalid(
            text,
            format!(
                "{zone} is not this machine's time zone ({}): give the time in UTC (`snapshots --utc` shows it so) or with an offset, e.g. `{civil} +01:00`",
                local.strftime("%Z")
            ),
        ));
    }
    let normal = t.replacen(' ', "T", 1);
    if let Ok(dt) = normal.parse::<DateTime>() {
        return at_local(dt);
    }
    match normal.parse::<Date>() {
        Ok(d) => at_local(d.to_datetime(Time::midnight())),
        Err(e) => Err(invalid(text, e)),
    }
}

/// Whether `text`, a time [`parse_at`] reads, is relative to now (`now`,
/// `today …`, `yesterday …`, `… ago`): another instant each time it is
/// read.
pub fn is_relative(text: &str) -> bool {
    let lower = text.trim().to_ascii_lowercase();
    matches!(
        lower.split_whitespace().next(),
        Some("now" | "today" | "yesterday")
    ) || lower.ends_with("ago")
}

/// The forms of a time, for errors.
const FORMS: &str = "a time is `now`, `today 9:30`, `yesterday 18:00`, `2h ago`, `2026-12-02 18:00[:05] [ZONE|+01:00]` or `2026-12-02T17:00:00Z`; a snapshot's name has no colon or space";

fn parse_time_of_day(text: &str) -> Option<Time> {
    let mut parts = text.split(':');
    let h: i8 = parts.next()?.parse().ok()?;
    let m: i8 = parts.next()?.parse().ok()?;
    let s: i8 = match parts.next() {
        Some(s) => s.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Time::new(h, m, s, 0).ok()
}

/// An instant as the wire and the server take it:
/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn wire(ts: Timestamp) -> String {
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What to send for `--at`: a time made an instant in UTC (as of now, in
/// this machine's time zone), anything else as it is (a snapshot's name).
pub fn resolve_at(text: &str) -> Result<String, Error> {
    resolve_at_in(text, &Zoned::now())
}

/// [`resolve_at`] as of `now`.
pub fn resolve_at_in(text: &str, now: &Zoned) -> Result<String, Error> {
    Ok(match parse_at(text, now)? {
        Some(ts) => wire(ts),
        None => text.to_string(),
    })
}

/// `ms` since the Unix epoch for people: local time with its zone
/// (`2026-12-02 18:00:05 CET`), or UTC with `utc`.
pub fn show(ms: u64, utc: bool) -> String {
    show_in(
        ms,
        if utc {
            TimeZone::UTC
        } else {
            TimeZone::system()
        },
    )
}

/// [`show`] in `tz`.
pub fn show_in(ms: u64, tz: TimeZone) -> String {
    match Timestamp::from_millisecond(ms as i64) {
        Ok(ts) => ts.to_zoned(tz).strftime("%Y-%m-%d %H:%M:%S %Z").to_string(),
        Err(_) => format!("{ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin_at(text: &str) -> Zoned {
        let tz = TimeZone::get("Europe/Berlin").expect("tzdata");
        text.parse::<DateTime>().unwrap().to_zoned(tz).unwrap()
    }

    #[test]
    fn local_and_relative_times_become_utc_instants() {
        // 10:00 in Berlin (CET, UTC+1) on 3 December 2026.
        let now = berlin_at("2026-12-03T10:00:00");
        let at = |t: &str| resolve_at_in(t, &now).unwrap();
        assert_eq!(at("yesterday 18:00"), "2026-12-02T17:00:00Z");
        assert_eq!(at("Yesterday"), "2026-12-01T23:00:00Z");
        assert_eq!(at("today 9:30"), "2026-12-03T08:30:00Z");
        assert_eq!(at("now"), "2026-12-03T09:00:00Z");
        assert_eq!(at("2h ago"), "2026-12-03T07:00:00Z");
        assert_eq!(at("3 days ago"), "2026-11-30T09:00:00Z");
        assert_eq!(at("2026-12-02 18:00"), "2026-12-02T17:00:00Z");
        assert_eq!(at("2026-12-02T18:00:05"), "2026-12-02T17:00:05Z");
        assert_eq!(at("2026-12-02"), "2026-12-01T23:00:00Z");
        // Instants stay what they are.
        assert_eq!(at("2026-12-02T18:00:00Z"), "2026-12-02T18:00:00Z");
        assert_eq!(at("2026-12-02T18:00+05:00"), "2026-12-02T13:00:00Z");
        // Summer time counts: 18:00 in July is UTC+2 in Berlin.
        assert_eq!(at("2026-07-01 18:00"), "2026-07-01T16:00:00Z");
        // Snapshot names pass through.
        assert_eq!(at("before-upgrade"), "before-upgrade");
        assert_eq!(at("chicago"), "chicago");
        assert_eq!(at("2hago"), "2026-12-03T07:00:00Z");
        assert_eq!(at("2026-11-22T16.30.05Z"), "2026-11-22T16.30.05Z");
    }

    #[test]
    fn what_looks_like_a_time_but_is_not_one_is_an_error() {
        let now = berlin_at("2026-12-03T10:00:00");
        for bad in [
            "yesterday 25:00",
            "today at noon",
            "2 fortnights ago",
            "2026-13-01",
            "2026-02-30 10:00",
        ] {
            let e = resolve_at_in(bad, &now).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    /// A time as `snapshots` shows it, pasted, is the instant shown: with
    /// this machine's zone, UTC, or an offset; another zone's abbreviation
    /// (which this machine cannot read for sure) is refused, saying how.
    #[test]
    fn a_time_as_shown_reads_back_as_the_same_instant() {
        let now = berlin_at("2026-12-03T10:00:00");
        let at = |t: &str| resolve_at_in(t, &now);
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 2026-10-25 00:30 and 01:30 UTC are both 02:30 in Berlin (CEST,
        // then CET: the clock turned back at 01:00 UTC).
        let turned = 1_792_888_200_000u64;
        for ms in [
            1_795_365_005_000u64,
            1_782_921_600_000,
            turned,
            turned + 3_600_000,
        ] {
            // A winter time and a summer one (CET, CEST), and both times of
            // the hour the clock turned back.
            for shown in [show_in(ms, berlin.clone()), show_in(ms, TimeZone::UTC)] {
                let instant = wire(Timestamp::from_millisecond(ms as i64).unwrap());
                assert_eq!(at(&shown).unwrap(), instant, "{shown}");
            }
        }
        assert_eq!(
            at("2026-12-02 18:00:05 +05:00").unwrap(),
            "2026-12-02T13:00:05Z"
        );
        assert_eq!(at("2026-12-02T18:00 utc").unwrap(), "2026-12-02T18:00:00Z");
        let e = at("2026-12-02 18:00:05 JST").unwrap_err().to_string();
        assert!(
            e.contains("not this machine's time zone (CET)") && e.contains("--utc"),
            "{e}"
        );
        let e = at("2026-12-02 18:00:05 +5 hours").unwrap_err().to_string();
        assert!(e.contains("2026-12-02 18:00:05 +5 hours"), "{e}");
        // A time of day alone, or words no time or name is made of.
        let e = at("18:00").unwrap_err().to_string();
        assert!(e.contains("`today 18:00` or `yesterday 18:00`"), "{e}");
        let e = at("last tuesday").unwrap_err().to_string();
        assert!(e.contains("a snapshot's name has no colon or space"), "{e}");
        // A second's fraction, as other tools write instants.
        assert_eq!(
            at("2026-12-07T21:14:33.270000+00:00").unwrap(),
            "2026-12-07T21:14:33Z"
        );
        assert_eq!(
            at("2026-12-07T21:14:33.5Z").unwrap(),
            "2026-12-07T21:14:33Z"
        );
        assert_eq!(
            at("2026-12-07 22:14:33.5").unwrap(),
            "2026-12-07T21:14:33Z",
            "local (Berlin) with a fraction"
        );
        // Nothing at all (an empty variable pasted) is neither.
        for empty in ["", "  "] {
            let e = at(empty).unwrap_err().to_string();
            assert!(e.contains("it is empty"), "{e}");
        }
    }

    #[test]
    fn times_show_in_the_zone_asked() {
        // 2026-11-22T16:30:05Z.
        let ms = 1_795_365_005_000;
        assert_eq!(show_in(ms, TimeZone::UTC), "2026-11-22 16:30:05 UTC");
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        assert_eq!(show_in(ms, tokyo), "2026-11-23 01:30:05 JST");
        assert_eq!(show(ms, true), "2026-11-22 16:30:05 UTC");
    }
}
