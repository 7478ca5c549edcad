//! What an iSCSI initiator sends, decoded: a PDU header and what follows
//! it (with and without digests), login/text keys and their negotiation,
//! and CDBs (with any data-out) from two I_T nexuses run against a small
//! in-memory unit, read-only or writable. Nothing may panic; a command
//! may never reach the unit outside its size, nor write to a read-only
//! one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirror_server::iscsi::pdu::{Pdu, BHS, MAX_DATA_SEGMENT};
use mirror_server::iscsi::scsi::{self, Lun};
use mirror_server::iscsi::text;
use mirror_server::iscsi::unit::{Nexus, Unit};
use std::sync::Arc;

struct Mem(std::sync::Mutex<Vec<u8>>, bool);

impl Lun for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset as usize + buf.len();
        let v = self.0.lock().unwrap();
        assert!(end <= v.len(), "read past the unit: {offset}+{}", buf.len());
        buf.copy_from_slice(&v[offset as usize..end]);
        Ok(())
    }
    fn writable(&self) -> bool {
        self.1
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset as usize + data.len();
        let mut v = self.0.lock().unwrap();
        assert!(self.1, "a write reached a read-only unit");
        assert!(
            end <= v.len(),
            "write past the unit: {offset}+{}",
            data.len()
        );
        v[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        assert!(self.1, "a zeroing reached a read-only unit");
        assert!(offset + len <= v.len() as u64, "zeroing past the unit");
        v[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn extent(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        assert!(offset < self.size(), "extent past the unit");
        Ok((
            offset < 4096,
            if offset < 4096 {
                4096 - offset
            } else {
                self.size() - offset
            },
        ))
    }
    fn id(&self) -> u64 {
        7
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let Some((bhs, rest)) = data.split_first_chunk::<BHS>() else {
                return;
            };
            let (hd, dd) = (selector & 4 != 0, selector & 8 != 0);
            if let Ok(len) = Pdu::parse_bhs(bhs, MAX_DATA_SEGMENT) {
                assert!(len.data <= MAX_DATA_SEGMENT);
                if rest.len() >= len.rest(hd, dd) {
                    let _ = Pdu::assemble(*bhs, len, rest, hd, dd);
                }
            }
        }
        1 => {
            if let Some(keys) = text::parse(data) {
                let mut params = text::Params::default();
                let _ = text::negotiate(&keys, &mut params);
                assert!(params.first_burst <= params.max_burst);
                assert!(params.max_send_data <= MAX_DATA_SEGMENT);
            }
        }
        _ if selector & 4 != 0 => {
            // No unit at the LUN asked.
            let Some((cdb, data_out)) = data.split_first_chunk::<16>() else {
                return;
            };
            if let Ok(scsi::Needs::Data(n)) = scsi::prepare(cdb, None) {
                assert!(n <= 16384 * 512);
            }
            let _ = scsi::execute(cdb, None, data_out);
        }
        _ => {
            // Commands from two I_T nexuses in turn (reservations, mode
            // pages, unit attentions between them), with resets and
            // sessions ending between commands. Each: a control byte, a
            // CDB, a data-out length byte and that much data.
            let lun = Arc::new(Mem(
                std::sync::Mutex::new(vec![0x5a; 64 * 1024]),
                selector & 8 != 0,
            ));
            let unit = Unit::new(lun);
            let nexuses = [Nexus::new("iqn.a", [1; 6]), Nexus::new("iqn.b", [2; 6])];
            for n in &nexuses {
                unit.attach(n);
            }
            let mut rest = data;
            while let Some((&control, tail)) = rest.split_first() {
                let Some((cdb, tail)) = tail.split_first_chunk::<16>() else {
                    return;
                };
                let Some((&len, tail)) = tail.split_first() else {
                    return;
                };
                let (data_out, tail) = tail.split_at(usize::from(len).min(tail.len()));
                rest = tail;
                let nexus = &nexuses[usize::from(control & 1)];
                match (control >> 1) & 3 {
                    1 => {
                        unit.detach(nexus);
                        unit.attach(nexus);
                    }
                    2 => unit.reset(nexus, control & 8 != 0),
                    _ => {}
                }
                if let Ok(scsi::Needs::Data(n)) = unit.prepare(cdb, nexus) {
                    assert!(n <= 16384 * 512);
                }
                let _ = unit.execute(cdb, nexus, data_out);
            }
        }
    }
});
