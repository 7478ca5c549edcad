//! The replication protocol's frame decoder, on whatever a peer could send:
//! a length prefix and a body. Decoding must never panic, never accept a
//! frame over the limit, and whatever it accepts must be a valid message
//! that encodes back to the same bytes (a hello but for its version: a
//! newer peer's number reads as ours).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublk_mirror_common::proto::{Message, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((prefix, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    match Message::frame_len(*prefix) {
        Ok(n) => assert!(n <= MAX_FRAME as usize),
        Err(_) => assert!(u32::from_le_bytes(*prefix) > MAX_FRAME),
    }
    if let Ok(message) = Message::decode(body) {
        assert!(message.validate().is_ok());
        let frame = message.encode();
        if matches!(message, Message::Hello { .. }) {
            // The variant and the magic as they came.
            assert_eq!(&frame[4..9], &body[..5], "{message:?} re-encodes differently");
            return;
        }
        assert_eq!(&frame[4..], body, "{message:?} re-encodes differently");
        assert_eq!(
            Message::frame_len(frame[..4].try_into().unwrap()),
            Ok(body.len())
        );
    }
});
