//! Durations as people write them: `500ms`, `5s`, `2m`, `1h`, `1.5s`,
//! `1h30m`, `2 days`, `1w`; a bare number is seconds. Used for timeouts and
//! intervals on the command line and in config files. Parsing is `jiff`'s
//! "friendly" span format (ISO 8601's `PT5M` too), with days of 24 hours;
//! months and years, which have no fixed length, are refused.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A span of time written by a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let err = |reason| Error::InvalidDuration {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("expected a number, e.g. 5s or 500ms"));
        }
        // A bare number is seconds (`--timeout 30`).
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            let secs: f64 = s.parse().map_err(|_| err("not a number"))?;
            return Duration::try_from_secs_f64(secs)
                .map(Span)
                .map_err(|_| err("too large"));
        }
        let span: jiff::Span = s
            .parse()
            .map_err(|_| err("expected e.g. 500ms, 5s, 2m, 1h30m or 2d"))?;
        if span.is_negative() {
            return Err(err("negative"));
        }
        let d = span
            .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
            .map_err(|_| err("months and years have no fixed length (use days)"))?;
        Duration::try_from(d)
            .map(Span)
            .map_err(|_| err("too large"))
    }
}

impl Span {
    /// For people, to the largest two units: `45s`, `12m`, `3h 12m`,
    /// `2d 4h` (an age, a lag; not to be parsed back).
    pub fn approx(self) -> String {
        let secs = self.0.as_secs();
        let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
        match (d, h, m) {
            (0, 0, 0) => format!("{secs}s"),
            (0, 0, m) => format!("{m}m"),
            (0, h, m) => format!("{h}h {m}m"),
            (d, h, _) => format!("{d}d {h}h"),
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 != 0 || ms == 0 {
            write!(f, "{ms}ms")
        } else if ms % 3_600_000 == 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_people_write() {
        let ms = |n| Span(Duration::from_millis(n));
        assert_eq!("500ms".parse::<Span>().ok(), Some(ms(500)));
        assert_eq!("5s".parse::<Span>().ok(), Some(ms(5000)));
        assert_eq!("1.5s".parse::<Span>().ok(), Some(ms(1500)));
        assert_eq!("2m".parse::<Span>().ok(), Some(ms(120_000)));
        assert_eq!("1h".parse::<Span>().ok(), Some(ms(3_600_000)));
        assert_eq!("3".parse::<Span>().ok(), Some(ms(3000)));
        assert_eq!("1h30m".parse::<Span>().ok(), Some(ms(5_400_000)));
        assert_eq!("24h5m".parse::<Span>().ok(), Some(ms(86_700_000)));
        assert_eq!("2 days".parse::<Span>().ok(), Some(ms(172_800_000)));
        assert_eq!("1d".parse::<Span>().ok(), Some(ms(86_400_000)));
        assert_eq!("1w".parse::<Span>().ok(), Some(ms(604_800_000)));
        assert_eq!("10 min".parse::<Span>().ok(), Some(ms(600_000)));
        assert_eq!("PT5M".parse::<Span>().ok(), Some(ms(300_000)));
        for bad in ["", "s", "5x", "-1s", "1e999s", "1mo", "2y", "1.5.2"] {
            assert!(bad.parse::<Span>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn approximates_for_people() {
        let s = |secs| Span(Duration::from_secs(secs)).approx();
        assert_eq!(s(45), "45s");
        assert_eq!(s(12 * 60 + 5), "12m");
        assert_eq!(s(3 * 3600 + 12 * 60), "3h 12m");
        assert_eq!(s(2 * 86400 + 4 * 3600 + 59), "2d 4h");
    }

    #[test]
    fn displays_the_way_it_parses() {
        for text in ["500ms", "5s", "2m", "1h", "1500ms", "0ms"] {
            assert_eq!(text.parse::<Span>().unwrap().to_string(), text);
        }
    }
}
