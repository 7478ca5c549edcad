//! Login and text keys (RFC 7143 §6, §13): `key=value` pairs separated by
//! NUL bytes, and the negotiation of operational parameters.

use std::collections::BTreeMap;

use super::pdu::MAX_DATA_SEGMENT;

/// Longest key or value accepted.
const MAX_ITEM: usize = 8192;

/// Parse `key=value\0…`; `None` for malformed text.
pub fn parse(data: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        if item.len() > MAX_ITEM {
            return None;
        }
        let text = std::str::from_utf8(item).ok()?;
        let (k, v) = text.split_once('=')?;
        if k.is_empty() {
            return None;
        }
        out.push((k.to_string(), v.to_string()));
    }
    Some(out)
}

/// Encode pairs as `key=value\0…`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// What a session negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// CRC32C on headers.
    pub header_digest: bool,
    /// CRC32C on data.
    pub data_digest: bool,
    /// The target waits for R2T before any data-out beyond immediate data.
    pub initial_r2t: bool,
    /// Data may come in the command PDU.
    pub immediate_data: bool,
    /// Most data the initiator takes in one PDU from us.
    pub max_send_data: usize,
    /// Most data one R2T (or unsolicited burst) covers.
    pub max_burst: usize,
    /// Most unsolicited data.
    pub first_burst: usize,
}

impl Default for Params {
    fn default() -> Self {
        // RFC 7143's defaults.
        Params {
            header_digest: false,
            data_digest: false,
            initial_r2t: true,
            immediate_data: true,
            max_send_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
        }
    }
}

fn number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

/// Answer the operational keys `offered` by an initiator, updating
/// `params`; returns the answers (keys we do not know: `NotUnderstood`).
/// Keys handled by the login itself (names, session type, auth) are left
/// to the caller: see [`is_login_key`].
pub fn negotiate(offered: &[(String, String)], params: &mut Params) -> Vec<(String, String)> {
    let mut answers: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for (i, (k, v)) in offered.iter().enumerate() {
        if is_login_key(k) {
            continue;
        }
        let answer = match k.as_str() {
            "HeaderDigest" | "DataDigest" => {
                // The first value of the initiator's list that we support.
                let pick = v
                    .split(',')
                    .find(|c| *c == "None" || *c == "CRC32C")
                    .unwrap_or("Reject");
                let on = pick == "CRC32C";
                if k == "HeaderDigest" {
                    params.header_digest = on;
                } else {
                    params.data_digest = on;
                }
                pick.to_string()
            }
            "MaxRecvDataSegmentLength" => {
                // Declarative: what the initiator takes from us.
                match number(v) {
                    Some(n) if (512..=16_777_215).contains(&n) => {
                        params.max_send_data = (n as usize).min(MAX_DATA_SEGMENT);
                    }
                    _ => {
                        answers.insert(i, (k.clone(), "Reject".into()));
                        continue;
                    }
                }
                // Answered with ours, apart (see [`declarations`]).
                continue;
            }
            "InitialR2T" => {
                // OR: we want R2T.
                params.initial_r2t = true;
                "Yes".into()
            }
            "ImmediateData" => {
                params.immediate_data = v == "Yes";
                if params.immediate_data { "Yes" } else { "No" }.into()
            }
            // Minimum of the offer and ours; an offer out of the range
            // RFC 7143 §13.13, §13.14 allow is rejected (the default holds).
            "MaxBurstLength" | "FirstBurstLength" => {
                match number(v).filter(|n| (512..=16_777_215).contains(n)) {
                    Some(n) if k == "MaxBurstLength" => {
                        params.max_burst = n.min(262_144) as usize;
                        params.max_burst.to_string()
                    }
                    Some(n) => {
                        params.first_burst = n.min(65_536) as usize;
                        params.first_burst.to_string()
                    }
                    None => "Reject".into(),
                }
            }
            "MaxOutstandingR2T" | "MaxConnections" => "1".into(),
            "ErrorRecoveryLevel" => "0".into(),
            // Maximum of the offer and ours (§13.15).
            "DefaultTime2Wait" => match number(v) {
                Some(n) if n <= 3600 => n.max(2).to_string(),
                _ => "Reject".into(),
            },
            "DefaultTime2Retain" => "0".into(),
            "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
            "IFMarker" | "OFMarker" => "No".into(),
            "IFMarkInt" | "OFMarkInt" => "Reject".into(),
            _ => "NotUnderstood".into(),
        };
        answers.insert(i, (k.clone(), answer));
    }
    if params.first_burst > params.max_burst {
        // FirstBurstLength never exceeds MaxBurstLength (§13.14): the
        // answer says the value that holds.
        params.first_burst = params.max_burst;
        for (k, v) in answers.values_mut() {
            if k == "FirstBurstLength" && v != "Reject" {
                *v = params.first_burst.to_string();
            }
        }
    }
    answers.into_values().collect()
}

/// Keys the login handles itself.
pub fn is_login_key(k: &str) -> bool {
    matches!(
        k,
        "InitiatorName"
            | "InitiatorAlias"
            | "TargetName"
            | "TargetAlias"
            | "SessionType"
            | "AuthMethod"
            | "TargetPortalGroupTag"
            | "TargetAddress"
            | "SendTargets"
    ) || k.starts_with("CHAP_")
}

/// What the target declares once, in the operational stage.
pub fn declarations() -> Vec<(String, String)> {
    vec![(
        "MaxRecvDataSegmentLength".into(),
        MAX_DATA_SEGMENT.to_string(),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn what_libiscsi_offers_is_answered() {
        // The keys libiscsi 1.19 sends (notes/iscsi-anchors.md §1.4).
        let offered = kv(&[
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("X#NodeArchitecture", "x"),
        ]);
        let mut p = Params::default();
        let answers = negotiate(&offered, &mut p);
        let get = |k: &str| {
            answers
                .iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("HeaderDigest"), Some("None"));
        assert_eq!(get("InitialR2T"), Some("Yes"));
        assert_eq!(get("FirstBurstLength"), Some("65536"));
        assert_eq!(get("X#NodeArchitecture"), Some("NotUnderstood"));
        assert_eq!(get("MaxRecvDataSegmentLength"), None);
        assert!(!p.header_digest && p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_send_data, 262_144);
        let mut q = Params::default();
        negotiate(&kv(&[("HeaderDigest", "CRC32C,None")]), &mut q);
        assert!(q.header_digest);
    }

    /// Burst lengths are the minimum of offer and ours, FirstBurstLength
    /// never past MaxBurstLength in the answer either; out of range or not
    /// numbers, they are rejected. DefaultTime2Wait is the maximum.
    #[test]
    fn burst_lengths_and_time_to_wait_follow_their_result_functions() {
        let mut p = Params::default();
        let answers = negotiate(
            &kv(&[
                ("FirstBurstLength", "65536"),
                ("MaxBurstLength", "16384"),
                ("DefaultTime2Wait", "5"),
            ]),
            &mut p,
        );
        assert_eq!(
            answers,
            kv(&[
                ("FirstBurstLength", "16384"),
                ("MaxBurstLength", "16384"),
                ("DefaultTime2Wait", "5"),
            ])
        );
        assert_eq!((p.first_burst, p.max_burst), (16384, 16384));
        let mut q = Params::default();
        let answers = negotiate(
            &kv(&[
                ("MaxBurstLength", "256"),
                ("FirstBurstLength", "lots"),
                ("DefaultTime2Wait", "0"),
            ]),
            &mut q,
        );
        assert_eq!(
            answers,
            kv(&[
                ("MaxBurstLength", "Reject"),
                ("FirstBurstLength", "Reject"),
                ("DefaultTime2Wait", "2"),
            ])
        );
        assert_eq!((q.first_burst, q.max_burst), (65_536, 262_144));
    }

    #[test]
    fn text_parses_and_rejects_junk() {
        let t = encode(&kv(&[("A", "1"), ("SendTargets", "All")]));
        assert_eq!(
            parse(&t).unwrap(),
            kv(&[("A", "1"), ("SendTargets", "All")])
        );
        assert!(parse(b"noequals\0").is_none());
        assert!(parse(b"=v\0").is_none());
        assert!(parse(&[0xff, b'=', b'1', 0]).is_none());
    }
}
