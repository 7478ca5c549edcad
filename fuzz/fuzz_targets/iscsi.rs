//! What an iSCSI initiator sends, decoded: a PDU header and what follows
//! it (with and without digests), login/text keys and their negotiation,
//! and a CDB run against a small in-memory unit. Nothing may panic, and a
//! command may never reach the unit outside its size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirror_server::iscsi::pdu::{Pdu, BHS, MAX_DATA_SEGMENT};
use mirror_server::iscsi::scsi::{self, Lun};
use mirror_server::iscsi::text;

struct Mem(Vec<u8>);

impl Lun for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset as usize + buf.len();
        assert!(
            end <= self.0.len(),
            "read past the unit: {offset}+{}",
            buf.len()
        );
        buf.copy_from_slice(&self.0[offset as usize..end]);
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
        _ => {
            let Some((cdb, data_out)) = data.split_first_chunk::<16>() else {
                return;
            };
            let unit = Mem(vec![0x5a; 64 * 1024]);
            let lun: Option<&dyn Lun> = if selector & 4 != 0 { None } else { Some(&unit) };
            if let Ok(scsi::Needs::Data(n)) = scsi::prepare(cdb, lun) {
                assert!(n <= 16384 * 512);
            }
            let _ = scsi::execute(cdb, lun, data_out);
        }
    }
});
