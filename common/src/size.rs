//! Byte sizes as people write them on a command line or in a config file.
//!
//! `4096`, `512K`, `10G`, `1.5TiB` and `64 MiB` all parse (the `parse-size`
//! crate); suffixes are binary (`K` = 1024, and `KB` too), as for
//! `truncate -s` and `qemu-img`; a fraction of a byte rounds to the nearest. Display picks the largest
//! unit that shows the value exactly, so a size prints the way it was meant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const UNITS: [(&str, u32); 6] = [
    ("E", 60),
    ("P", 50),
    ("T", 40),
    ("G", 30),
    ("M", 20),
    ("K", 10),
];

impl ByteSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl ByteSize {
    /// An approximate, short form for people: `16.0MiB`, `512B`, `1.5GiB`.
    pub fn approx(self) -> String {
        let n = self.0;
        for (name, shift) in UNITS {
            let unit = 1u64 << shift;
            if n >= unit {
                return format!("{:.1}{name}iB", n as f64 / unit as f64);
            }
        }
        format!("{n}B")
    }
}

impl FromStr for ByteSize {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let err = |reason| Error::InvalidSize {
            input: input.to_string(),
            reason,
        };
        parse_size::Config::new()
            .with_binary()
            .parse_size(input.trim())
            .map(ByteSize)
            .map_err(|e| match e {
                parse_size::Error::Empty => err("expected a number, like 10G or 4096"),
                parse_size::Error::InvalidDigit => {
                    err("not a number with a known unit (K, M, G, T, P or E; binary)")
                }
                parse_size::Error::PosOverflow => err("too large"),
                _ => err("not a size"),
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (name, shift) in UNITS {
            let unit = 1u64 << shift;
            if n >= unit && n % unit == 0 {
                return write!(f, "{}{}iB", n >> shift, name);
            }
        }
        write!(f, "{n}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_people_write() {
        let cases = [
            ("4096", 4096),
            ("0", 0),
            ("512K", 512 << 10),
            ("512k", 512 << 10),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("10 GB", 10 << 30),
            ("64 MiB", 64 << 20),
            ("1.5T", 3 << 39),
            ("0.5K", 512),
            ("1B", 1),
        ];
        for (text, want) in cases {
            assert_eq!(
                text.parse::<ByteSize>().ok(),
                Some(ByteSize(want)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_nonsense_with_a_reason() {
        for bad in ["", "G", "ten", "10X", "1.2.3", "99999999999E", "-1", "."] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
        let err = "10X".parse::<ByteSize>().unwrap_err();
        assert!(err.to_string().contains("known unit"), "{err}");
        assert_eq!("0.3K".parse::<ByteSize>().ok(), Some(ByteSize(307)));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(10 << 30).to_string(), "10GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(ByteSize(4097).to_string(), "4097B");
        assert_eq!(ByteSize(0).to_string(), "0B");
    }

    #[test]
    fn approximates_for_people() {
        assert_eq!(ByteSize(16409 << 10).approx(), "16.0MiB");
        assert_eq!(ByteSize(512).approx(), "512B");
        assert_eq!(ByteSize(3 << 29).approx(), "1.5GiB");
    }

    proptest! {
        #[test]
        fn display_round_trips(n in any::<u64>()) {
            let shown = ByteSize(n).to_string();
            prop_assert_eq!(shown.parse::<ByteSize>().ok(), Some(ByteSize(n)));
        }
    }
}
