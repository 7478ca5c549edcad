//! SCSI commands for one logical unit, sans-IO over a [`Lun`], with every
//! range checked before the backend is touched: from SPC-4's "Commands for
//! all device types", those an initiator probes a unit with (INQUIRY and
//! its vital product data pages, REPORT LUNS, TEST UNIT READY, REQUEST
//! SENSE, MODE SENSE, REPORT SUPPORTED OPERATION CODES); from SBC-3's
//! "Commands for direct access block devices", those a disk is read and
//! written with (READ CAPACITY, READ, VERIFY, SYNCHRONIZE CACHE, PRE-FETCH,
//! GET LBA STATUS, and the write class: WRITE, WRITE AND VERIFY, WRITE
//! SAME, UNMAP, ORWRITE, COMPARE AND WRITE). A read-only unit answers every
//! write-class command DATA PROTECT / WRITE PROTECTED and sets the WP bit.

/// Bytes per logical block.
///
/// (The unit is read-only or a throwaway overlay: see [`Lun::writable`].)
pub const BLOCK: u64 = 512;
/// Most blocks one READ or VERIFY may move (8 MiB; in the Block Limits
/// page).
pub const MAX_TRANSFER_BLOCKS: u64 = 16384;
/// Most descriptors one GET LBA STATUS answer carries.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

/// What a logical unit stores.
pub trait Lun: Send + Sync {
    /// Bytes (a multiple of [`BLOCK`]).
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `offset` (checked to be inside).
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Whether the bytes at `offset` are mapped (hold data) or a hole
    /// (read as zeroes), and how far that goes.
    fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)>;
    /// A stable identifier (becomes the NAA designator and serial).
    fn id(&self) -> u64;
    /// Whether writes are taken.
    fn writable(&self) -> bool {
        false
    }
    /// Write `data` at `offset` (checked to be inside).
    fn write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem))
    }
    /// Make `len` bytes at `offset` read as zeroes (unmapped).
    fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem))
    }
    /// Make what was written durable.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether software write protect (the control page's SWP) is what
    /// keeps it from writes just now.
    fn software_protected(&self) -> bool {
        false
    }
}

/// Most blocks one COMPARE AND WRITE covers (Block Limits page).
pub const MAX_COMPARE_AND_WRITE: u64 = 128;
/// Most blocks one WRITE SAME covers (Block Limits page).
pub const MAX_WRITE_SAME_BLOCKS: u64 = 16384;
/// Most blocks one UNMAP command covers, over all its descriptors.
pub const MAX_UNMAP_BLOCKS: u64 = 1 << 20;
/// Most UNMAP descriptors in one command.
pub const MAX_UNMAP_DESCRIPTORS: u64 = 256;

/// Fixed-format sense: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Its qualifier.
    pub ascq: u8,
    /// The INFORMATION field (e.g. the offset of a miscompare).
    pub info: Option<u32>,
    /// The CDB byte an INVALID FIELD IN CDB is about (sense-key specific).
    pub field: Option<u16>,
}

impl Sense {
    pub(crate) const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }

    /// This sense, pointing at CDB byte `byte`.
    pub const fn at(self, byte: u16) -> Sense {
        Sense {
            field: Some(byte),
            ..self
        }
    }

    /// 18 bytes of fixed-format sense data.
    pub fn bytes(&self) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        s[2] = self.key;
        if let Some(info) = self.info {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(byte) = self.field {
            // SKSV, C/D (a CDB field), field pointer.
            s[15] = 0xc0;
            s[16..18].copy_from_slice(&byte.to_be_bytes());
        }
        s
    }
}

/// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
/// ILLEGAL REQUEST / INVALID FIELD IN CDB.
pub const INVALID_FIELD: Sense = Sense::new(0x05, 0x24, 0x00);
/// ILLEGAL REQUEST / INVALID FIELD IN INFORMATION UNIT: an iSCSI
/// expected length the command cannot be carried out with.
pub const INVALID_FIELD_IN_IU: Sense = Sense::new(0x05, 0x0e, 0x03);
/// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
/// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
pub const NO_SUCH_LUN: Sense = Sense::new(0x05, 0x25, 0x00);
/// ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED.
pub const NO_SAVING: Sense = Sense::new(0x05, 0x39, 0x00);
/// DATA PROTECT / WRITE PROTECTED.
pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
/// MEDIUM ERROR / UNRECOVERED READ ERROR.
pub const READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
/// MEDIUM ERROR / WRITE ERROR.
pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);
/// DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT: a thin unit
/// whose backing store is (nearly) full.
pub const NO_SPACE: Sense = Sense::new(0x07, 0x27, 0x07);

/// The sense of a write the unit could not make: out of space, or an
/// error of the medium.
fn write_failed(e: std::io::Error) -> Sense {
    if e.kind() == std::io::ErrorKind::StorageFull {
        NO_SPACE
    } else {
        WRITE_ERROR
    }
}
/// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR.
pub const PARAMETER_LENGTH: Sense = Sense::new(0x05, 0x1a, 0x00);
/// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST.
pub const INVALID_PARAMETER: Sense = Sense::new(0x05, 0x26, 0x00);
/// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION.
pub const MISCOMPARE: Sense = Sense::new(0x0e, 0x1d, 0x00);
/// ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR: RFC 7143 §11.4.7.2's
/// answer when a command's data went missing on the way (a Data-Out out
/// of sequence implies an earlier one was lost).
pub const DATA_LOST: Sense = Sense::new(0x0b, 0x47, 0x05);
/// ABORTED COMMAND / (write error) INCORRECT AMOUNT OF DATA: a data
/// burst that ended before what was asked (RFC 7143 §11.4.7.2).
pub const WRONG_AMOUNT: Sense = Sense::new(0x0b, 0x0c, 0x0d);

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// How a command ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// GOOD, with data for the initiator (possibly none).
    Good(Vec<u8>),
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT: another I_T nexus holds a reservation.
    Conflict,
}

/// What a command needs from the initiator before it can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing: run it.
    Nothing,
    /// This many bytes of data-out.
    Data(u64),
}

pub(crate) fn be16(b: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([b[0], b[1]]))
}

pub(crate) fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Whether an opcode changes the medium.
pub fn is_write_class(opcode: u8) -> bool {
    matches!(
        opcode,
        0x0a | 0x2a | 0xaa | 0x8a // WRITE 6/10/12/16
            | 0x2e | 0xae | 0x8e // WRITE AND VERIFY
            | 0x41 | 0x93 // WRITE SAME
            | 0x42 // UNMAP
            | 0x8b // ORWRITE
            | 0x89 // COMPARE AND WRITE
            | 0x04 // FORMAT UNIT
            | 0x48 // SANITIZE
    )
}

/// Writes that take the whole blocks of whatever data came when the
/// initiator sent less than the CDB asks (WRITE, WRITE AND VERIFY); the
/// others need all of it.
pub fn takes_short_data(opcode: u8) -> bool {
    matches!(opcode, 0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e)
}

/// The LBA and block count of a READ/VERIFY/SYNC/PRE-FETCH-like CDB.
fn range(cdb: &[u8]) -> Option<(u64, u64)> {
    Some(match cdb[0] {
        0x08 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | be16(&cdb[2..4]);
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n)
        }
        0x28 | 0x2f | 0x35 | 0x34 => (be32(&cdb[2..6]), be16(&cdb[7..9])),
        0xa8 | 0xaf => (be32(&cdb[2..6]), be32(&cdb[6..10])),
        0x88 | 0x8f | 0x91 | 0x90 => (be64(&cdb[2..10]), be32(&cdb[10..14])),
        _ => return None,
    })
}

/// The LBA and block count of a write-class CDB that moves blocks.
fn write_range(cdb: &[u8]) -> Option<(u64, u64)> {
    Some(match cdb[0] {
        0x0a => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | be16(&cdb[2..4]);
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n)
        }
        0x2a | 0x2e | 0x41 => (be32(&cdb[2..6]), be16(&cdb[7..9])),
        0xaa | 0xae => (be32(&cdb[2..6]), be32(&cdb[6..10])),
        0x8a | 0x8e | 0x8b | 0x93 => (be64(&cdb[2..10]), be32(&cdb[10..14])),
        0x89 => (be64(&cdb[2..10]), u64::from(cdb[13])),
        _ => return None,
    })
}

/// A write-class command's LBA and block count; for WRITE SAME, a count
/// of zero means up to the end of the unit (WSNZ is 0), refused past it.
fn write_extent(cdb: &[u8], lun: &dyn Lun) -> Result<(u64, u64), Sense> {
    let (lba, n) = write_range(cdb).ok_or(INVALID_OPCODE)?;
    if matches!(cdb[0], 0x41 | 0x93) && n == 0 {
        let blocks = lun.size() / BLOCK;
        if lba >= blocks {
            return Err(LBA_OUT_OF_RANGE);
        }
        return Ok((lba, blocks - lba));
    }
    Ok((lba, n))
}

/// What a write-class command on a writable unit needs, checked.
fn prepare_write(cdb: &[u8; 16], lun: &dyn Lun) -> Result<Needs, Sense> {
    let opcode = cdb[0];
    if opcode == 0x42 {
        // UNMAP: ANCHOR is not supported; the parameter list follows.
        if cdb[1] & 0x01 != 0 {
            return Err(INVALID_FIELD);
        }
        let len = be16(&cdb[7..9]);
        return Ok(if len == 0 {
            Needs::Nothing
        } else {
            Needs::Data(len)
        });
    }
    let (lba, n) = write_extent(cdb, lun)?;
    if opcode != 0x0a && cdb[1] >> 5 != 0 {
        // WRPROTECT: no protection information here.
        return Err(INVALID_FIELD);
    }
    match opcode {
        0x41 | 0x93 => {
            if cdb[1] & 0x10 != 0 {
                // ANCHOR: not supported (ANC_SUP is 0).
                return Err(INVALID_FIELD);
            }
            if n > MAX_WRITE_SAME_BLOCKS {
                return Err(INVALID_FIELD);
            }
            check_range(lun, lba, n)?;
            let ndob = opcode == 0x93 && cdb[1] & 0x01 != 0;
            Ok(if ndob {
                Needs::Nothing
            } else {
                Needs::Data(BLOCK)
            })
        }
        0x89 => {
            if n > MAX_COMPARE_AND_WRITE {
                return Err(INVALID_FIELD);
            }
            check_range(lun, lba, n)?;
            Ok(if n == 0 {
                Needs::Nothing
            } else {
                Needs::Data(2 * n * BLOCK)
            })
        }
        _ => {
            check_range(lun, lba, n)?;
            if n > MAX_TRANSFER_BLOCKS {
                return Err(INVALID_FIELD);
            }
            Ok(if n == 0 {
                Needs::Nothing
            } else {
                Needs::Data(n * BLOCK)
            })
        }
    }
}

/// Carry out a write-class command on a writable unit.
fn run_write(cdb: &[u8; 16], lun: &dyn Lun, data: &[u8]) -> Result<Vec<u8>, Sense> {
    let opcode = cdb[0];
    let needs = prepare_write(cdb, lun)?;
    if let Needs::Data(n) = needs {
        if (data.len() as u64) < n && !takes_short_data(opcode) {
            return Err(INVALID_FIELD);
        }
    }
    if opcode == 0x42 {
        return unmap(cdb, lun, data);
    }
    let (lba, n) = write_extent(cdb, lun)?;
    let at = lba * BLOCK;
    let len = n * BLOCK;
    match opcode {
        0x41 | 0x93 => {
            let ndob = opcode == 0x93 && cdb[1] & 0x01 != 0;
            let block: &[u8] = if ndob {
                &[0u8; BLOCK as usize]
            } else {
                &data[..BLOCK as usize]
            };
            if cdb[1] & 0x08 != 0 || ublk_mirror_common::block::is_zero(block) {
                // UNMAP asked (whatever the block holds: unmapped blocks
                // read as zeroes, LBPRZ), or zeroes: a hole either way.
                lun.zero(at, len).map_err(write_failed)?;
            } else {
                // Data: written.
                let per = (1u64 << 20) / BLOCK;
                let chunk: Vec<u8> = block.repeat(per.min(n) as usize);
                let mut done = 0u64;
                while done < n {
                    let k = per.min(n - done);
                    lun.write(at + done * BLOCK, &chunk[..(k * BLOCK) as usize])
                        .map_err(write_failed)?;
                    done += k;
                }
            }
        }
        0x89 => {
            if n > 0 {
                let mut have = vec![0u8; len as usize];
                lun.read(at, &mut have).map_err(|_| READ_ERROR)?;
                let (verify, write) = data.split_at(len as usize);
                if let Some(i) = have.iter().zip(verify).position(|(a, b)| a != b) {
                    return Err(Sense {
                        info: Some(i as u32),
                        ..MISCOMPARE
                    });
                }
                lun.write(at, &write[..len as usize])
                    .map_err(write_failed)?;
            }
        }
        0x8b => {
            if n > 0 {
                let mut have = vec![0u8; len as usize];
                lun.read(at, &mut have).map_err(|_| READ_ERROR)?;
                for (h, d) in have.iter_mut().zip(data) {
                    *h |= d;
                }
                lun.write(at, &have).map_err(write_failed)?;
            }
        }
        _ => {
            // Less data than the CDB says (the initiator's expected length
            // was shorter: an overflow, told in the residual): the whole
            // blocks that came.
            let whole = (data.len() as u64 / BLOCK).min(n) * BLOCK;
            if whole > 0 {
                lun.write(at, &data[..whole as usize])
                    .map_err(write_failed)?;
            }
            if cdb[1] & 0x08 != 0 && opcode != 0x0a {
                // FUA: durable before GOOD.
                lun.flush().map_err(write_failed)?;
            }
        }
    }
    Ok(Vec::new())
}

/// UNMAP's parameter list: every descriptor is checked before any is
/// carried out.
fn unmap(cdb: &[u8; 16], lun: &dyn Lun, data: &[u8]) -> Result<Vec<u8>, Sense> {
    let len = be16(&cdb[7..9]) as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    if len < 8 || data.len() < len {
        return Err(PARAMETER_LENGTH);
    }
    let block_len = be16(&data[2..4]) as usize;
    if block_len % 16 != 0 || 8 + block_len > len {
        return Err(PARAMETER_LENGTH);
    }
    let descriptors: Vec<(u64, u64)> = data[8..8 + block_len]
        .chunks_exact(16)
        .map(|d| (be64(&d[..8]), be32(&d[8..12])))
        .collect();
    if descriptors.len() as u64 > MAX_UNMAP_DESCRIPTORS {
        return Err(INVALID_PARAMETER);
    }
    let total: u64 = descriptors.iter().map(|&(_, n)| n).sum();
    if total > MAX_UNMAP_BLOCKS {
        return Err(INVALID_PARAMETER);
    }
    for &(lba, n) in &descriptors {
        check_range(lun, lba, n)?;
    }
    for (lba, n) in descriptors {
        if n > 0 {
            lun.zero(lba * BLOCK, n * BLOCK).map_err(write_failed)?;
        }
    }
    Ok(Vec::new())
}

/// Commands this unit reports as supported (REPORT SUPPORTED OPERATION
/// CODES): opcode, service action (if any), CDB length.
fn supported() -> Vec<(u8, Option<u16>, u16)> {
    let mut v: Vec<(u8, Option<u16>, u16)> = vec![
        (0x00, None, 6),
        (0x03, None, 6),
        (0x08, None, 6),
        (0x12, None, 6),
        (0x15, None, 6),
        (0x16, None, 6),
        (0x17, None, 6),
        (0x1a, None, 6),
        (0x1b, None, 6),
        (0x1e, None, 6),
        (0x25, None, 10),
        (0x28, None, 10),
        (0x2f, None, 10),
        (0x34, None, 10),
        (0x35, None, 10),
        (0x55, None, 10),
        (0x5a, None, 10),
        (0x5e, Some(0), 10),
        (0x5e, Some(1), 10),
        (0x5e, Some(2), 10),
        (0x5e, Some(3), 10),
        (0x5f, Some(0), 10),
        (0x5f, Some(1), 10),
        (0x5f, Some(2), 10),
        (0x5f, Some(3), 10),
        (0x5f, Some(4), 10),
        (0x5f, Some(5), 10),
        (0x5f, Some(6), 10),
        (0x88, None, 16),
        (0x8f, None, 16),
        (0x90, None, 16),
        (0x91, None, 16),
        (0x9e, Some(0x10), 16),
        (0x9e, Some(0x12), 16),
        (0xa0, None, 12),
        (0xa3, Some(0x0c), 12),
        (0xa8, None, 12),
        (0xaf, None, 12),
    ];
    // A read-only unit lists its writes too: they exist, and answer DATA
    // PROTECT.
    v.extend([
        (0x0a, None, 6),
        (0x2a, None, 10),
        (0x2e, None, 10),
        (0x41, None, 10),
        (0x42, None, 10),
        (0x89, None, 16),
        (0x8a, None, 16),
        (0x8b, None, 16),
        (0x8e, None, 16),
        (0x93, None, 16),
        (0xaa, None, 12),
        (0xae, None, 12),
    ]);
    v.sort_unstable();
    v
}

fn report_opcodes(cdb: &[u8; 16], lun: &dyn Lun) -> Result<Vec<u8>, Sense> {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let opcode = cdb[3];
    let sa = be16(&cdb[4..6]) as u16;
    let alloc = be32(&cdb[6..10]);
    let _ = lun;
    let list = supported();
    let timeouts = |out: &mut Vec<u8>| {
        // Command timeouts descriptor: length 10, no recommendations.
        out.extend_from_slice(&[0, 10, 0, 0]);
        out.extend_from_slice(&[0; 8]);
    };
    match options {
        0 => {
            let mut body = Vec::new();
            for &(op, action, len) in &list {
                let mut d = [0u8; 8];
                d[0] = op;
                if let Some(a) = action {
                    d[2..4].copy_from_slice(&a.to_be_bytes());
                    d[5] |= 0x01;
                }
                if rctd {
                    d[5] |= 0x02;
                }
                d[6..8].copy_from_slice(&len.to_be_bytes());
                body.extend_from_slice(&d);
                if rctd {
                    timeouts(&mut body);
                }
            }
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend(body);
            Ok(truncate(out, alloc))
        }
        1 | 2 => {
            let found = list.iter().find(|&&(op, action, _)| {
                op == opcode
                    && (options == 1 && action.is_none() || options == 2 && action == Some(sa))
            });
            let has_actions = list.iter().any(|&(op, a, _)| op == opcode && a.is_some());
            if options == 1 && has_actions {
                // It has service actions: asking without one is an error.
                return Err(INVALID_FIELD.at(2));
            }
            if options == 2 && !has_actions && list.iter().any(|&(op, _, _)| op == opcode) {
                // It has none: asking for one is an error.
                return Err(INVALID_FIELD.at(2));
            }
            let mut out = vec![0u8; 4];
            match found {
                Some(&(op, _, len)) => {
                    out[1] = 0x03 | if rctd { 0x80 } else { 0 };
                    out[2..4].copy_from_slice(&len.to_be_bytes());
                    let mut usage = vec![0xffu8; len as usize];
                    usage[0] = op;
                    if let Some(last) = usage.last_mut() {
                        *last = 0x07;
                    }
                    out.extend(usage);
                    if rctd {
                        timeouts(&mut out);
                    }
                }
                None => out[1] = 0x01,
            }
            Ok(truncate(out, alloc))
        }
        _ => Err(INVALID_FIELD.at(2)),
    }
}

fn check_range(lun: &dyn Lun, lba: u64, n: u64) -> Result<(), Sense> {
    let blocks = lun.size() / BLOCK;
    match lba.checked_add(n) {
        Some(end) if end <= blocks => Ok(()),
        _ => Err(LBA_OUT_OF_RANGE),
    }
}

/// The CDB's length for its opcode group, if it is one we parse.
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// Before a command runs: what it needs (data-out), or why it is refused
/// at once (a write to a read-only unit, a bad field, a range).
pub fn prepare(cdb: &[u8; 16], lun: Option<&dyn Lun>) -> Result<Needs, Sense> {
    let Some(lun) = lun else {
        return Ok(Needs::Nothing);
    };
    let opcode = cdb[0];
    if is_write_class(opcode) {
        if !lun.writable() {
            return Err(WRITE_PROTECTED);
        }
        return prepare_write(cdb, lun);
    }
    match opcode {
        0x2f | 0xaf | 0x8f => {
            let (lba, n) = range(cdb).ok_or(INVALID_FIELD)?;
            if cdb[1] >> 5 != 0 {
                return Err(INVALID_FIELD);
            }
            check_range(lun, lba, n)?;
            match (cdb[1] >> 1) & 3 {
                0 => Ok(Needs::Nothing),
                1 if n <= MAX_TRANSFER_BLOCKS => Ok(Needs::Data(n * BLOCK)),
                _ => Err(INVALID_FIELD),
            }
        }
        _ => Ok(Needs::Nothing),
    }
}

/// Run a command on `lun` (`None`: no unit at that LUN) with the data-out
/// [`prepare`] asked for.
pub fn execute(cdb: &[u8; 16], lun: Option<&dyn Lun>, data_out: &[u8]) -> Outcome {
    match run(cdb, lun, data_out) {
        Ok(data) => Outcome::Good(data),
        Err(sense) => Outcome::Check(sense),
    }
}

fn run(cdb: &[u8; 16], lun: Option<&dyn Lun>, data_out: &[u8]) -> Result<Vec<u8>, Sense> {
    let opcode = cdb[0];
    match (opcode, lun) {
        (0xa0, _) => report_luns(cdb),
        (0x12, None) => {
            // Peripheral qualifier 3: no unit here.
            if cdb[1] & 1 != 0 {
                return Err(INVALID_FIELD);
            }
            let mut d = vec![0u8; 36];
            d[0] = 0x7f;
            d[4] = 31;
            Ok(truncate(d, be16(&cdb[3..5])))
        }
        (0x03, None) => request_sense(cdb),
        (_, None) => Err(NO_SUCH_LUN),
        (_, Some(lun)) => run_on(cdb, lun, data_out),
    }
}

fn truncate(mut d: Vec<u8>, alloc: u64) -> Vec<u8> {
    d.truncate(alloc as usize);
    d
}

fn request_sense(cdb: &[u8; 16]) -> Result<Vec<u8>, Sense> {
    Ok(sense_data(cdb, Sense::new(0, 0, 0)))
}

/// REQUEST SENSE's data for `sense`: fixed format, or descriptor format
/// (its header) when DESC is set; cut at the allocation length.
pub(crate) fn sense_data(cdb: &[u8; 16], sense: Sense) -> Vec<u8> {
    let d = if cdb[1] & 0x01 != 0 {
        vec![0x72, sense.key, sense.asc, sense.ascq, 0, 0, 0, 0]
    } else {
        sense.bytes()
    };
    truncate(d, u64::from(cdb[4]))
}

fn report_luns(cdb: &[u8; 16]) -> Result<Vec<u8>, Sense> {
    let alloc = be32(&cdb[6..10]);
    if alloc < 16 {
        return Err(INVALID_FIELD);
    }
    if cdb[2] > 2 {
        return Err(INVALID_FIELD);
    }
    let mut d = vec![0u8; 16];
    d[3] = 8;
    Ok(truncate(d, alloc))
}

fn run_on(cdb: &[u8; 16], lun: &dyn Lun, data_out: &[u8]) -> Result<Vec<u8>, Sense> {
    let opcode = cdb[0];
    if is_write_class(opcode) {
        if !lun.writable() {
            return Err(WRITE_PROTECTED);
        }
        return run_write(cdb, lun, data_out);
    }
    let blocks = lun.size() / BLOCK;
    match opcode {
        0x00 | 0x1b | 0x1e => Ok(Vec::new()),
        0x03 => request_sense(cdb),
        0x12 => inquiry(cdb, lun),
        0x25 => {
            let mut d = vec![0u8; 8];
            let last = blocks.saturating_sub(1).min(0xffff_ffff) as u32;
            d[..4].copy_from_slice(&last.to_be_bytes());
            d[4..].copy_from_slice(&(BLOCK as u32).to_be_bytes());
            Ok(d)
        }
        0x9e => match cdb[1] & 0x1f {
            0x10 => {
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0: any 512-byte
                // block reads and writes on its own here (no read-modify-
                // write); the 4 KiB that suits the store best is said as
                // the optimal granularity in VPD page B0 instead.
                d[13] = 0;
                // LBPME: thin (holes reported); LBPRZ: holes read zeroes.
                d[14] = 0x80 | 0x40;
                Ok(truncate(d, be32(&cdb[10..14])))
            }
            0x12 => lba_status(cdb, lun),
            _ => Err(INVALID_FIELD),
        },
        0x1a | 0x5a => mode_sense(cdb, lun),
        0x08 | 0x28 | 0xa8 | 0x88 => {
            if opcode != 0x08 && cdb[1] >> 5 != 0 {
                // RDPROTECT: no protection information here.
                return Err(INVALID_FIELD);
            }
            let (lba, n) = range(cdb).ok_or(INVALID_FIELD)?;
            check_range(lun, lba, n)?;
            if n > MAX_TRANSFER_BLOCKS {
                return Err(INVALID_FIELD);
            }
            let mut data = vec![0u8; (n * BLOCK) as usize];
            lun.read(lba * BLOCK, &mut data).map_err(|_| READ_ERROR)?;
            Ok(data)
        }
        0x2f | 0xaf | 0x8f => {
            let (lba, n) = range(cdb).ok_or(INVALID_FIELD)?;
            if cdb[1] >> 5 != 0 {
                return Err(INVALID_FIELD);
            }
            check_range(lun, lba, n)?;
            if (cdb[1] >> 1) & 3 == 1 {
                if data_out.len() as u64 != n * BLOCK {
                    return Err(INVALID_FIELD);
                }
                let mut data = vec![0u8; data_out.len()];
                lun.read(lba * BLOCK, &mut data).map_err(|_| READ_ERROR)?;
                if let Some(at) = data.iter().zip(data_out).position(|(a, b)| a != b) {
                    return Err(Sense {
                        info: Some(at as u32),
                        ..MISCOMPARE
                    });
                }
            }
            Ok(Vec::new())
        }
        0x35 | 0x91 => {
            let (lba, n) = range(cdb).ok_or(INVALID_FIELD)?;
            check_range(lun, lba, n)?;
            lun.flush().map_err(write_failed)?;
            Ok(Vec::new())
        }
        0x34 | 0x90 => {
            let (lba, n) = range(cdb).ok_or(INVALID_FIELD)?;
            check_range(lun, lba, n)?;
            Ok(Vec::new())
        }
        0xa3 if cdb[1] & 0x1f == 0x0c => report_opcodes(cdb, lun),
        _ => Err(INVALID_OPCODE),
    }
}

fn inquiry(cdb: &[u8; 16], lun: &dyn Lun) -> Result<Vec<u8>, Sense> {
    let evpd = cdb[1] & 1 != 0;
    let page = cdb[2];
    let alloc = be16(&cdb[3..5]);
    if cdb[1] & 0xfe != 0 || (!evpd && page != 0) {
        return Err(INVALID_FIELD);
    }
    let id = lun.id();
    let serial = format!("{id:016x}");
    let d = if !evpd {
        let mut d = vec![0u8; 74];
        d[0] = 0x00; // direct access block device
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HiSup, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(b"UBLKMIRR");
        let product = if lun.writable() {
            b"MIRROR OVERLAY  "
        } else {
            b"MIRROR SNAPSHOT "
        };
        d[16..32].copy_from_slice(product);
        d[32..36].copy_from_slice(b"0001");
        // Version descriptors: SBC-3, SPC-4, iSCSI.
        for (i, v) in [0x04c0u16, 0x0460, 0x0960].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        d
    } else {
        let mut body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => serial.into_bytes(),
            0x83 => {
                // One designator: NAA locally assigned (type 3), binary,
                // associated with the logical unit.
                let naa = (3u64 << 60) | (id & ((1 << 60) - 1));
                let mut v = vec![0x01, 0x03, 0x00, 0x08];
                v.extend_from_slice(&naa.to_be_bytes());
                v
            }
            0xb0 => {
                // Offsets are the page's, less its 4-byte header.
                let mut v = vec![0u8; 0x3c];
                if lun.writable() {
                    v[1] = MAX_COMPARE_AND_WRITE as u8;
                }
                // Optimal transfer length granularity (4 KiB), maximum and
                // optimal transfer lengths.
                v[2..4].copy_from_slice(&8u16.to_be_bytes());
                v[4..8].copy_from_slice(&(MAX_TRANSFER_BLOCKS as u32).to_be_bytes());
                v[8..12].copy_from_slice(&128u32.to_be_bytes());
                if lun.writable() {
                    v[16..20].copy_from_slice(&(MAX_UNMAP_BLOCKS as u32).to_be_bytes());
                    v[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
                    v[24..28].copy_from_slice(&8u32.to_be_bytes());
                    v[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
                }
                v
            }
            0xb1 => {
                let mut v = vec![0u8; 0x3c];
                v[1] = 0x01; // non-rotating medium
                v
            }
            0xb2 => {
                // LBPRZ; thin provisioning (holes are reported); no UNMAP
                // on a read-only unit.
                let unmap = if lun.writable() {
                    0x80 | 0x40 | 0x20
                } else {
                    0
                };
                vec![0x00, unmap | 0x04, 0x02, 0x00]
            }
            _ => return Err(INVALID_FIELD),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.append(&mut body);
        d
    };
    Ok(truncate(d, alloc))
}

fn lba_status(cdb: &[u8; 16], lun: &dyn Lun) -> Result<Vec<u8>, Sense> {
    let lba = be64(&cdb[2..10]);
    let alloc = be32(&cdb[10..14]);
    let blocks = lun.size() / BLOCK;
    if lba >= blocks {
        return Err(LBA_OUT_OF_RANGE);
    }
    let room = ((alloc.saturating_sub(8)) / 16) as usize;
    let mut descriptors = Vec::new();
    let mut at = lba;
    while at < blocks && descriptors.len() < room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS) {
        let (mapped, len) = lun.extent(at * BLOCK).map_err(|_| READ_ERROR)?;
        let n = (len / BLOCK).clamp(1, blocks - at).min(0xffff_ffff);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&at.to_be_bytes());
        d[8..12].copy_from_slice(&(n as u32).to_be_bytes());
        d[12] = if mapped { 0 } else { 1 };
        descriptors.push(d);
        at += n;
    }
    let mut out = vec![0u8; 8];
    let len = (4 + 16 * descriptors.len()) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d);
    }
    Ok(truncate(out, alloc))
}

/// The current values of mode page `page` (caching, control with SWP
/// as given, informational exceptions), `None` when there is no such
/// page. Of them, MODE SELECT may change only the control page's SWP.
pub(crate) fn mode_page(page: u8, swp: bool) -> Option<Vec<u8>> {
    let mut p = match page {
        0x08 => vec![0u8; 20],
        0x0a | 0x1c => vec![0u8; 12],
        _ => return None,
    };
    p[0] = page;
    p[1] = (p.len() - 2) as u8;
    match page {
        0x08 => p[2] = 0x04, // WCE: a volatile cache (nothing is lost here)
        0x0a => {
            p[2] = 0x02; // GLTSD
            if swp {
                p[4] = 0x08;
            }
            p[8] = 0xff; // busy timeout period: unlimited
            p[9] = 0xff;
        }
        _ => {}
    }
    Some(p)
}

fn mode_sense(cdb: &[u8; 16], lun: &dyn Lun) -> Result<Vec<u8>, Sense> {
    let ten = cdb[0] == 0x5a;
    let dbd = cdb[1] & 0x08 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        be16(&cdb[7..9])
    } else {
        u64::from(cdb[4])
    };
    if pc == 3 {
        return Err(NO_SAVING);
    }
    if subpage != 0 && subpage != 0xff {
        return Err(INVALID_FIELD);
    }
    let changeable = pc == 1;
    // Changeable values: only the control page's SWP.
    let page_of = |code: u8| -> Vec<u8> {
        let mut p = mode_page(code, lun.software_protected()).unwrap_or_default();
        if changeable {
            p[2..].fill(0);
            if code == 0x0a {
                p[4] = 0x08;
            }
        }
        p
    };
    let pages = match page {
        0x08 | 0x0a | 0x1c => page_of(page),
        0x3f => [0x08, 0x0a, 0x1c].into_iter().flat_map(page_of).collect(),
        _ => return Err(INVALID_FIELD),
    };
    let blocks = lun.size() / BLOCK;
    let mut descriptor = Vec::new();
    if !dbd {
        descriptor = vec![0u8; 8];
        // The short block descriptor's count is 4 bytes (SBC-3 §6.4.2);
        // past it, all ones.
        let n = blocks.min(0xffff_ffff) as u32;
        descriptor[..4].copy_from_slice(&n.to_be_bytes());
        descriptor[4] = 0;
        descriptor[5..8].copy_from_slice(&(BLOCK as u32).to_be_bytes()[1..]);
    }
    let device_specific = if lun.writable() { 0x10 } else { 0x80 | 0x10 };
    let mut d = if ten {
        let total = 8 + descriptor.len() + pages.len();
        let mut h = vec![0u8; 8];
        h[..2].copy_from_slice(&((total - 2) as u16).to_be_bytes());
        h[3] = device_specific;
        h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
        h
    } else {
        let total = 4 + descriptor.len() + pages.len();
        vec![
            (total - 1) as u8,
            0,
            device_specific,
            descriptor.len() as u8,
        ]
    };
    d.extend(descriptor);
    d.extend(pages);
    Ok(truncate(d, alloc))
}

/// Units in memory, for the tests of this module and of the unit.
#[cfg(test)]
pub(crate) mod testing {
    use super::Lun;
    use std::sync::Mutex;

    /// What a test unit does before each write: nothing, wait, or fail it.
    pub(crate) type BeforeWrite = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

    /// A writable unit in memory, all of it mapped.
    pub(crate) struct RwMem {
        /// What it holds.
        pub(crate) data: Mutex<Vec<u8>>,
        before_write: BeforeWrite,
    }

    impl RwMem {
        /// A unit holding `data`.
        pub(crate) fn new(data: Vec<u8>) -> RwMem {
            RwMem::with(data, Box::new(|| Ok(())))
        }

        /// A unit holding `data` that calls `before_write` before each
        /// write (its error fails the write).
        pub(crate) fn with(data: Vec<u8>, before_write: BeforeWrite) -> RwMem {
            RwMem {
                data: Mutex::new(data),
                before_write,
            }
        }
    }

    impl Lun for RwMem {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(&self.data.lock().unwrap()[offset as usize..][..buf.len()]);
            Ok(())
        }
        fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
            Ok((true, self.size() - offset))
        }
        fn id(&self) -> u64 {
            1
        }
        fn writable(&self) -> bool {
            true
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            (self.before_write)()?;
            self.data.lock().unwrap()[offset as usize..][..data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.data.lock().unwrap()[offset as usize..][..len as usize].fill(0);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB: data in the first 64 KiB, then a hole.
    struct Mem(Vec<u8>);

    impl Lun for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..][..buf.len()]);
            Ok(())
        }
        fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
            Ok(if offset < 65536 {
                (true, 65536 - offset)
            } else {
                (false, self.size() - offset)
            })
        }
        fn id(&self) -> u64 {
            0x1234
        }
    }

    fn mem() -> Mem {
        let mut v = vec![0u8; 1 << 20];
        for (i, b) in v[..65536].iter_mut().enumerate() {
            *b = i as u8;
        }
        Mem(v)
    }

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    /// A unit of `.0` bytes, all holes.
    struct Sized(u64);

    impl Lun for Sized {
        fn size(&self) -> u64 {
            self.0
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
            Ok((false, self.0 - offset))
        }
        fn id(&self) -> u64 {
            1
        }
    }

    /// MODE SENSE's block descriptor counts up to 2^32 - 1 blocks (a 16
    /// GiB unit has 2^25; it said 2^24 - 1), all ones past it.
    #[test]
    fn the_mode_block_descriptor_counts_past_eight_gib() {
        for (size, want) in [
            (16u64 << 30, (16u64 << 30) / BLOCK),
            (4u64 << 40, 0xffff_ffff),
        ] {
            let d = mode_sense(&cdb(&[0x1a, 0, 0x3f, 0, 255, 0]), &Sized(size)).unwrap();
            // Header (4 bytes), then the descriptor.
            assert_eq!(d[3], 8, "block descriptor length");
            assert_eq!(
                u64::from(u32::from_be_bytes(d[4..8].try_into().unwrap())),
                want
            );
        }
    }

    #[test]
    fn reads_are_range_checked_and_writes_refused() {
        let m = mem();
        let lun: Option<&dyn Lun> = Some(&m);
        let blocks = (1u64 << 20) / BLOCK;
        // READ(10) of 2 blocks at LBA 1.
        let Outcome::Good(d) = execute(&cdb(&[0x28, 0, 0, 0, 0, 1, 0, 0, 2, 0]), lun, &[]) else {
            panic!()
        };
        assert_eq!(d, m.0[512..1536]);
        // READ(16) past the end, and wrapping.
        let mut c = cdb(&[0x88]);
        c[2..10].copy_from_slice(&(blocks - 1).to_be_bytes());
        c[10..14].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(execute(&c, lun, &[]), Outcome::Check(LBA_OUT_OF_RANGE));
        c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(execute(&c, lun, &[]), Outcome::Check(LBA_OUT_OF_RANGE));
        // RDPROTECT is refused.
        assert_eq!(
            execute(&cdb(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]), lun, &[]),
            Outcome::Check(INVALID_FIELD)
        );
        // Every write-class opcode: DATA PROTECT, before anything else.
        for op in [
            0x0a, 0x2a, 0xaa, 0x8a, 0x2e, 0xae, 0x8e, 0x41, 0x93, 0x42, 0x8b, 0x89,
        ] {
            assert_eq!(prepare(&cdb(&[op]), lun), Err(WRITE_PROTECTED), "{op:#x}");
            assert_eq!(
                execute(&cdb(&[op]), lun, &[]),
                Outcome::Check(WRITE_PROTECTED)
            );
        }
        // No unit at another LUN.
        assert_eq!(
            execute(&cdb(&[0x00]), None, &[]),
            Outcome::Check(NO_SUCH_LUN)
        );
        assert_eq!(
            execute(&cdb(&[0x99]), lun, &[]),
            Outcome::Check(INVALID_OPCODE)
        );
    }

    #[test]
    fn writes_take_whole_blocks_of_what_came_and_check_their_fields() {
        let m = testing::RwMem::new(vec![7u8; 1 << 20]);
        let lun: Option<&dyn Lun> = Some(&m);
        // WRITE(10) of 2 blocks with only 200, then 700 bytes sent (the
        // initiator's expected length was short): whole blocks only.
        let c = cdb(&[0x2a, 0, 0, 0, 0, 4, 0, 0, 2, 0]);
        assert_eq!(prepare(&c, lun), Ok(Needs::Data(1024)));
        assert_eq!(execute(&c, lun, &[1u8; 200]), Outcome::Good(Vec::new()));
        assert!(m.data.lock().unwrap()[2048..3072].iter().all(|&b| b == 7));
        assert_eq!(execute(&c, lun, &[1u8; 700]), Outcome::Good(Vec::new()));
        assert!(m.data.lock().unwrap()[2048..2560].iter().all(|&b| b == 1));
        assert!(m.data.lock().unwrap()[2560..3072].iter().all(|&b| b == 7));
        // WRITE SAME and COMPARE AND WRITE need their data whole.
        let ws = cdb(&[0x41, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
        assert_eq!(
            execute(&ws, lun, &[1u8; 100]),
            Outcome::Check(INVALID_FIELD)
        );
        assert_eq!(execute(&ws, lun, &[3u8; 512]), Outcome::Good(Vec::new()));
        assert!(m.data.lock().unwrap()[..4096].iter().all(|&b| b == 3));
        let mut caw = cdb(&[0x89]);
        caw[13] = 1;
        assert_eq!(
            execute(&caw, lun, &[3u8; 600]),
            Outcome::Check(INVALID_FIELD)
        );
        let mut both = vec![3u8; 512];
        both.extend([9u8; 512]);
        assert_eq!(execute(&caw, lun, &both), Outcome::Good(Vec::new()));
        let Outcome::Check(s) = execute(&caw, lun, &both) else {
            panic!("a miscompare was not told")
        };
        assert_eq!(s.key, 0x0e);
        // UNMAP: a descriptor past the end refuses the whole list.
        let mut param = vec![0u8; 24];
        param[1] = 22;
        param[3] = 16;
        param[8..16].copy_from_slice(&((1u64 << 20) / 512).to_be_bytes());
        param[19] = 1;
        let un = cdb(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]);
        assert_eq!(execute(&un, lun, &param), Outcome::Check(LBA_OUT_OF_RANGE));
        param[8..16].copy_from_slice(&0u64.to_be_bytes());
        assert_eq!(execute(&un, lun, &param), Outcome::Good(Vec::new()));
        assert!(m.data.lock().unwrap()[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn verify_compares_and_reports_where() {
        let m = mem();
        let lun: Option<&dyn Lun> = Some(&m);
        let c = cdb(&[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(prepare(&c, lun), Ok(Needs::Data(512)));
        let mut data = m.0[..512].to_vec();
        assert_eq!(execute(&c, lun, &data), Outcome::Good(Vec::new()));
        data[100] ^= 1;
        let Outcome::Check(s) = execute(&c, lun, &data) else {
            panic!()
        };
        assert_eq!((s.key, s.asc, s.info), (0x0e, 0x1d, Some(100)));
    }

    #[test]
    fn capacity_holes_and_write_protect_are_reported() {
        let m = mem();
        let lun: Option<&dyn Lun> = Some(&m);
        let mut c = cdb(&[0x9e, 0x10]);
        c[13] = 32;
        let Outcome::Good(d) = execute(&c, lun, &[]) else {
            panic!()
        };
        assert_eq!(be64(&d[..8]), 2047);
        assert_eq!(d[14] & 0x80, 0x80, "LBPME");
        // GET LBA STATUS from LBA 0: mapped 128 blocks, then a hole.
        let mut c = cdb(&[0x9e, 0x12]);
        c[13] = 255;
        let Outcome::Good(d) = execute(&c, lun, &[]) else {
            panic!()
        };
        assert_eq!(be32(&d[..4]), 4 + 32);
        assert_eq!((be64(&d[8..16]), be32(&d[16..20]), d[20]), (0, 128, 0));
        assert_eq!((be64(&d[24..32]), be32(&d[32..36]), d[36]), (128, 1920, 1));
        c[2..10].copy_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(execute(&c, lun, &[]), Outcome::Check(LBA_OUT_OF_RANGE));
        // MODE SENSE(6), all pages: WP set.
        let Outcome::Good(d) = execute(&cdb(&[0x1a, 0, 0x3f, 0, 255, 0]), lun, &[]) else {
            panic!()
        };
        assert_eq!(d[2] & 0x80, 0x80);
        assert_eq!(usize::from(d[0]) + 1, d.len());
        assert_eq!(
            execute(&cdb(&[0x1a, 0, 0xc8, 0, 255, 0]), lun, &[]),
            Outcome::Check(NO_SAVING)
        );
        // INQUIRY: EVPD=0 with a page code is refused.
        assert_eq!(
            execute(&cdb(&[0x12, 0, 0x80, 0, 255, 0]), lun, &[]),
            Outcome::Check(INVALID_FIELD)
        );
        let Outcome::Good(d) = execute(&cdb(&[0x12, 1, 0x83, 0, 255, 0]), lun, &[]) else {
            panic!()
        };
        assert_eq!(d[1], 0x83);
        assert_eq!(d[8] >> 4, 3, "NAA type 3");
    }

    #[test]
    fn a_full_store_is_space_allocation_failed_not_a_medium_error() {
        let mut c = [0u8; 16];
        c[0] = 0x2a;
        c[8] = 1;
        let full = testing::RwMem::with(
            vec![0; 1 << 20],
            Box::new(|| Err(std::io::Error::from(std::io::ErrorKind::StorageFull))),
        );
        assert_eq!(
            execute(&c, Some(&full), &[1; 512]),
            Outcome::Check(NO_SPACE)
        );
    }
}
