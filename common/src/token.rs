//! Enrollment tokens: what `mirror-server client add NAME` prints and
//! `ublk-mirror enroll TOKEN` takes. One line a person can paste:
//!
//! ```text
//! umt1/NAME/SECRET/FINGERPRINT/HOST:PORT
//! ```
//!
//! `SECRET` is 32 random bytes in hex, good once and until it expires (the
//! server keeps only its SHA-256); `FINGERPRINT` is the server
//! certificate's SHA-256 in hex, which the client pins from then on. The
//! address comes last, so an IPv6 address needs no quoting.

use std::fmt;
use std::str::FromStr;

use crate::identity::Fingerprint;
use crate::proto::check_name;
use crate::{hex, Error};

const PREFIX: &str = "umt1";

/// An enrollment token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The client name it enrolls.
    pub name: String,
    /// The one-time secret.
    pub secret: [u8; 32],
    /// The server certificate to pin.
    pub server: Fingerprint,
    /// Where the server listens (`host:port`).
    pub address: String,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}/{}/{}/{}/{}",
            self.name,
            hex::encode(&self.secret),
            hex::encode(&self.server.0),
            self.address
        )
    }
}

impl FromStr for Token {
    type Err = Error;

    fn from_str(s: &str) -> Result<Token, Error> {
        let bad = |why: &str| Error::Identity(format!("not an enrollment token: {why}"));
        let mut parts = s.trim().splitn(5, '/');
        if parts.next() != Some(PREFIX) {
            return Err(bad("it does not start with umt1/ (copy the whole line `mirror-server client add` printed)"));
        }
        let (Some(name), Some(secret), Some(fp), Some(address)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it is cut short"));
        };
        check_name(name).map_err(|e| bad(&e.to_string()))?;
        let secret =
            hex::decode::<32>(secret).ok_or_else(|| bad("the secret is not 64 hex digits"))?;
        let server =
            hex::decode::<32>(fp).ok_or_else(|| bad("the fingerprint is not 64 hex digits"))?;
        check_addresses(address).map_err(|e| bad(&e))?;
        Ok(Token {
            name: name.to_string(),
            secret,
            server: Fingerprint(server),
            address: address.to_string(),
        })
    }
}

/// Check a token's server addresses: `HOST:PORT[,HOST:PORT...]` (an IPv6
/// address in brackets), each with a port from 1 to 65535; what is wrong,
/// if anything.
pub fn check_addresses(list: &str) -> Result<(), String> {
    if list.is_empty() {
        return Err("the server address is empty".into());
    }
    for address in list.split(',').map(str::trim) {
        let Some((host, port)) = address.rsplit_once(':') else {
            return Err(format!(
                "the server address {address:?} has no port (HOST:PORT)"
            ));
        };
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            // A name, an IPv4 address, or an IPv6 one without brackets.
            host.parse::<std::net::Ipv6Addr>().is_ok()
                || !host.is_empty()
                    && !host.contains(|c: char| c == ':' || c.is_whitespace() || c == '/')
        };
        if !host_ok {
            return Err(format!(
                "the server address {address:?} has no usable host (HOST:PORT; an IPv6 address in brackets)"
            ));
        }
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!(
                "the server address {address:?} has no usable port (1 to 65535)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_damage_is_explained() {
        let t = Token {
            name: "laptop-7".into(),
            secret: [0xab; 32],
            server: Fingerprint([0x01; 32]),
            address: "[2001:db8::1]:4747".into(),
        };
        let line = t.to_string();
        assert!(line.starts_with("umt1/laptop-7/abab"), "{line}");
        assert_eq!(line.parse::<Token>().unwrap(), t);
        for (bad, why) in [
            ("x", "does not start"),
            ("umt1/laptop", "cut short"),
            ("umt1/a b/00/00/h:1", "invalid name"),
            (&line.replace("abab", "zzzz"), "secret"),
            (&line.replace("[2001:db8::1]:4747", "host"), "no port"),
        ] {
            let err = bad.parse::<Token>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        for (list, why) in [
            ("host:99999", "usable port"),
            ("a:1,,b:2", "no port"),
            ("nohost", "no port"),
            (":4747", "usable host"),
            ("[::1:4747", "usable host"),
        ] {
            let err = check_addresses(list).unwrap_err();
            assert!(err.contains(why), "{list}: {err}");
        }
        check_addresses("mirror.example:4747, [2001:db8::2]:4747,10.0.0.1:1,2001:db8::3:4747")
            .unwrap();
        // Interchangeable servers: several addresses, tried in order.
        let several = Token {
            address: "a.example:4747,[2001:db8::2]:4747".into(),
            ..t
        };
        assert_eq!(several.to_string().parse::<Token>().unwrap(), several);
    }
}
