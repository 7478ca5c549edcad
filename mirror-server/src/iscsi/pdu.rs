//! iSCSI PDUs (RFC 7143 §11): the 48-byte basic header segment, additional
//! headers, the data segment (padded to 4 bytes), and optional CRC32C
//! digests after each. Sans-IO: [`Pdu::parse_bhs`] checks a header before
//! anything else is read, and [`Pdu::encode`] builds one buffer to send in
//! a single write.

use std::fmt;

/// Bytes of the basic header segment.
pub const BHS: usize = 48;

/// Largest data segment accepted from an initiator (what we declare as
/// MaxRecvDataSegmentLength), and largest we ever send.
pub const MAX_DATA_SEGMENT: usize = 256 << 10;

/// Opcodes, initiator to target.
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RSP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TMF_RSP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RSP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RSP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RSP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Why a PDU cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduError {
    /// An opcode an initiator does not send.
    Opcode(u8),
    /// A data segment longer than we accept.
    TooLong(usize),
    /// A header digest that does not match.
    HeaderDigest,
    /// A data digest that does not match.
    DataDigest,
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::Opcode(o) => write!(f, "opcode {o:#04x} is not one an initiator sends"),
            PduError::TooLong(n) => write!(
                f,
                "data segment of {n} bytes is over the {MAX_DATA_SEGMENT} we accept"
            ),
            PduError::HeaderDigest => write!(f, "header digest mismatch"),
            PduError::DataDigest => write!(f, "data digest mismatch"),
        }
    }
}

/// One PDU: its header and data segment (unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The basic header segment.
    pub bhs: [u8; BHS],
    /// Additional header segments (as received; we send none).
    pub ahs: Vec<u8>,
    /// The data segment.
    pub data: Vec<u8>,
}

/// What the BHS says must follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    /// Bytes of additional header segments.
    pub ahs: usize,
    /// Bytes of data (before padding).
    pub data: usize,
}

impl Lengths {
    /// Bytes to read after the BHS, digests included.
    pub fn rest(&self, header_digest: bool, data_digest: bool) -> usize {
        let mut n = self.ahs + pad4(self.data);
        if header_digest {
            n += 4;
        }
        if data_digest && self.data > 0 {
            n += 4;
        }
        n
    }
}

/// `n` rounded up to a multiple of 4.
pub fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// CRC32C as iSCSI digests use it (stored little-endian on the wire).
pub fn digest(bytes: &[u8]) -> [u8; 4] {
    crc32c::crc32c(bytes).to_le_bytes()
}

impl Pdu {
    /// A PDU with opcode `opcode` and an empty header otherwise.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Check a received BHS: its opcode and lengths.
    pub fn parse_bhs(bhs: &[u8; BHS], max_data: usize) -> Result<Lengths, PduError> {
        let opcode = bhs[0] & 0x3f;
        if !matches!(
            opcode,
            op::NOP_OUT
                | op::SCSI_CMD
                | op::TMF_REQ
                | op::LOGIN_REQ
                | op::TEXT_REQ
                | op::DATA_OUT
                | op::LOGOUT_REQ
                | op::SNACK
        ) {
            return Err(PduError::Opcode(opcode));
        }
        let data = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        if data > max_data {
            return Err(PduError::TooLong(data));
        }
        Ok(Lengths {
            ahs: usize::from(bhs[4]) * 4,
            data,
        })
    }

    /// Assemble a PDU from its BHS and the bytes after it (as
    /// [`Lengths::rest`] counts them), checking digests.
    pub fn assemble(
        bhs: [u8; BHS],
        len: Lengths,
        rest: &[u8],
        header_digest: bool,
        data_digest: bool,
    ) -> Result<Pdu, PduError> {
        let ahs = rest[..len.ahs].to_vec();
        let mut at = len.ahs;
        if header_digest {
            let mut h = bhs.to_vec();
            h.extend_from_slice(&ahs);
            if rest[at..at + 4] != digest(&h) {
                return Err(PduError::HeaderDigest);
            }
            at += 4;
        }
        let data = rest[at..at + len.data].to_vec();
        at += pad4(len.data);
        if data_digest && len.data > 0 {
            let padded = &rest[at - pad4(len.data)..at];
            if rest[at..at + 4] != digest(padded) {
                return Err(PduError::DataDigest);
            }
        }
        Ok(Pdu { bhs, ahs, data })
    }

    /// The bytes to send: header (length filled in), digests as asked.
    pub fn encode(&self, header_digest: bool, data_digest: bool) -> Vec<u8> {
        let mut bhs = self.bhs;
        bhs[4] = 0;
        let n = self.data.len() as u32;
        bhs[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
        let mut out = Vec::with_capacity(BHS + 8 + pad4(self.data.len()));
        out.extend_from_slice(&bhs);
        if header_digest {
            let d = digest(&bhs);
            out.extend_from_slice(&d);
        }
        if !self.data.is_empty() {
            let start = out.len();
            out.extend_from_slice(&self.data);
            out.resize(start + pad4(self.data.len()), 0);
            if data_digest {
                let d = digest(&out[start..]);
                out.extend_from_slice(&d);
            }
        }
        out
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The immediate bit (initiator PDUs).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// Byte 1's flags.
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    /// The big-endian u32 at `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.bhs[at],
            self.bhs[at + 1],
            self.bhs[at + 2],
            self.bhs[at + 3],
        ])
    }

    /// Set the big-endian u32 at `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// The LUN field (bytes 8..16).
    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.bhs[8..16]);
        l
    }

    /// The LUN, as a single-level flat or peripheral address (the only
    /// kinds a target with a few units gives out).
    pub fn lun_number(&self) -> u16 {
        let lun = self.lun();
        (u16::from(lun[0] & 0x3f) << 8) | u16::from(lun[1])
    }

    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// CmdSN (requests).
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }

    /// ExpStatSN (requests).
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32_at(28)
    }
}

/// Whether serial number `a` is before `b` (RFC 1982, 32 bits).
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdus_round_trip_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut p = Pdu::new(op::SCSI_CMD);
            p.bhs[1] = 0x80;
            p.set_u32(16, 0x1234_5678);
            p.data = b"abcde".to_vec();
            let wire = p.encode(hd, dd);
            let mut bhs = [0u8; BHS];
            bhs.copy_from_slice(&wire[..BHS]);
            let len = Pdu::parse_bhs(&bhs, MAX_DATA_SEGMENT).unwrap();
            assert_eq!(len.data, 5);
            assert_eq!(BHS + len.rest(hd, dd), wire.len());
            let back = Pdu::assemble(bhs, len, &wire[BHS..], hd, dd).unwrap();
            assert_eq!(back.data, p.data);
            assert_eq!(back.itt(), 0x1234_5678);
            if hd {
                let mut bad = wire[BHS..].to_vec();
                bad[0] ^= 1;
                assert_eq!(
                    Pdu::assemble(bhs, len, &bad, hd, dd),
                    Err(PduError::HeaderDigest)
                );
            }
            if dd {
                let mut bad = wire[BHS..].to_vec();
                let n = bad.len();
                bad[n - 6] ^= 1;
                assert!(Pdu::assemble(bhs, len, &bad, hd, dd).is_err());
            }
        }
        // RFC 3720 appendix B.4: 32 bytes of zeroes.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn bad_headers_are_refused_before_their_data_is_read() {
        let mut bhs = [0u8; BHS];
        bhs[0] = op::DATA_IN; // a target's opcode
        assert_eq!(
            Pdu::parse_bhs(&bhs, MAX_DATA_SEGMENT),
            Err(PduError::Opcode(op::DATA_IN))
        );
        bhs[0] = op::SCSI_CMD;
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            Pdu::parse_bhs(&bhs, MAX_DATA_SEGMENT),
            Err(PduError::TooLong(_))
        ));
        assert!(sn_lt(0xffff_fff0, 3) && !sn_lt(3, 0xffff_fff0) && !sn_lt(5, 5));
    }
}
