//! Fuzz the segment reader: arbitrary bytes, as a whole file and as the plaintext body
//! of a correctly sealed segment, must give `Ok` or an error, never a panic.
//! Run: `cd changelog/fuzz && cargo fuzz run open_segment` (needs cargo-fuzz).
#![no_main]

use changelog::segment::{open, seal, ChainCursor, PlainSegment, SealParams};
use changelog::{Key, VolumeId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes([1; 32]);
    let volume = VolumeId::new("fuzz").unwrap();
    let _ = ChainCursor::start(volume.clone()).open_next(data.to_vec(), "fuzz", &key);
    if data.len() >= 12 {
        let first_seq = u64::from_le_bytes(data[..8].try_into().unwrap());
        let count = u32::from_le_bytes(data[8..12].try_into().unwrap()).max(1);
        let last_seq = first_seq.saturating_add(u64::from(count));
        let plain = PlainSegment::from_raw_body(&data[12..], first_seq, last_seq, count);
        let params = SealParams { volume, epoch: 1, index: 0, created_unix_ms: 0 };
        if let Ok(sealed) = seal(&plain, &params, &key) {
            let _ = open(sealed.link([0; 32]).bytes, "fuzz", &key);
        }
    }
});
