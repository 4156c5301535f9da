//! Fuzzes every decoder of firmware-proto with the same bytes: `frame::decode`,
//! `payload::decode`, and `Accumulator::feed` with chunk sizes taken from the input, so chunk
//! boundaries are fuzzed too. Beyond "no panic", it checks that whatever decodes is a valid
//! envelope that encodes and decodes back to itself, and that the accumulator's counters add up.
#![no_main]

use firmware_proto::{frame, payload, Accumulator};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for decoded in [frame::decode(data), payload::decode(data)].into_iter().flatten() {
        check_round_trip(decoded);
    }

    let chunk = data.first().map_or(1, |b| usize::from(*b % 64) + 1);
    let mut acc = Accumulator::new();
    let mut reported = 0u64;
    for part in data.chunks(chunk) {
        acc.feed(part, |result| {
            reported += 1;
            if let Ok(env) = result {
                check_round_trip(env);
            }
        });
    }
    let stats = acc.stats();
    assert_eq!(stats.frames_ok + stats.frames_bad, reported);
    assert!(stats.bytes_discarded <= data.len() as u64);
});

fn check_round_trip(env: firmware_proto::Envelope) {
    env.validate().expect("a decoded envelope is valid");
    let bytes = frame::encode_vec(&env).expect("a decoded envelope encodes again");
    assert_eq!(frame::decode(&bytes).as_ref(), Ok(&env));
    let bytes = payload::encode_vec(&env).expect("a decoded envelope encodes again");
    assert_eq!(payload::decode(&bytes).as_ref(), Ok(&env));
}
