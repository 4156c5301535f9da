//! Hostile input: garbage, corruption, truncation and arbitrary chunking never panic, never
//! decode into a different envelope, and cost at most the frame they land in: every valid
//! frame that follows a 0x00 decodes.

// The tests use the std helpers (encode_vec, postcard::to_allocvec).
#![cfg(feature = "std")]

mod common;

use common::*;
use firmware_proto::*;
use proptest::prelude::*;

/// Feeds `stream` in chunks of the given sizes (cycled; a size of 0 is taken as 1).
fn feed_chunked(acc: &mut Accumulator, stream: &[u8], sizes: &[usize]) -> Vec<Result<Envelope, FrameError>> {
    let mut got = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(1).clamp(1, rest.len());
        acc.feed(&rest[..n], |r| got.push(r));
        rest = &rest[n..];
        i += 1;
    }
    got
}

/// Whether `needles` appear in `haystack` in order (not necessarily adjacent).
fn is_subsequence(needles: &[Envelope], haystack: &[Envelope]) -> bool {
    let mut it = haystack.iter();
    needles.iter().all(|n| it.any(|h| h == n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        sizes in prop::collection::vec(1usize..700, 1..8),
    ) {
        let _ = frame::decode(&bytes);
        let _ = payload::decode(&bytes);
        let mut acc = Accumulator::new();
        let got = feed_chunked(&mut acc, &bytes, &sizes);
        let stats = acc.stats();
        prop_assert_eq!(stats.frames_ok + stats.frames_bad, got.len() as u64);
        prop_assert_eq!(stats.frames_ok, got.iter().filter(|r| r.is_ok()).count() as u64);
        prop_assert!(stats.bytes_discarded <= bytes.len() as u64);
        prop_assert!(acc.pending() < MAX_FRAME);
    }

    #[test]
    fn arbitrary_bytes_with_a_valid_crc_and_version_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..470),
    ) {
        // Gets past the CRC and version checks, so postcard sees arbitrary bytes.
        let mut bytes = vec![PROTOCOL_VERSION];
        bytes.extend(&body);
        bytes.extend(payload::crc32c(&bytes).to_le_bytes());
        if let Ok(env) = payload::decode(&bytes) {
            // Whatever decodes is a valid envelope that encodes again.
            prop_assert!(env.validate().is_ok());
            prop_assert!(payload::encode_vec(&env).is_ok());
        }
    }

    #[test]
    fn valid_frames_after_garbage_decode_once_a_zero_was_seen(
        segments in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..80), any::<bool>(), arb_fitting_envelope()),
            1..6,
        ),
        sizes in prop::collection::vec(1usize..200, 1..10),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        let mut all = Vec::new();
        for (garbage, zero_after, env) in segments {
            stream.extend(&garbage);
            if zero_after {
                stream.push(0);
            }
            // A frame decodes when the accumulator is at a frame boundary when it starts.
            if stream.last().is_none_or(|&b| b == 0) {
                expected.push(env.clone());
            }
            stream.extend(frame::encode_vec(&env).unwrap());
            all.push(env);
        }
        let mut acc = Accumulator::new();
        let got = feed_chunked(&mut acc, &stream, &sizes);
        let ok: Vec<Envelope> = got.into_iter().filter_map(Result::ok).collect();
        prop_assert!(is_subsequence(&expected, &ok), "expected {} frames in {} decoded", expected.len(), ok.len());
        // The last frame always ends with 0x00: nothing is left pending.
        prop_assert_eq!(acc.pending(), 0);
        // And nothing decodes into an envelope that was never sent (CRC-32C).
        prop_assert!(ok.iter().all(|e| all.contains(e)));
    }

    #[test]
    fn a_corrupted_byte_never_decodes_into_another_envelope(
        env in arb_fitting_envelope(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let mut f = frame::encode_vec(&env).unwrap();
        let i = at.index(f.len() - 1);
        f[i] ^= xor;
        prop_assert!(frame::decode(&f).is_err());
        let mut acc = Accumulator::new();
        let mut got = Vec::new();
        acc.feed(&f, |r| got.push(r));
        prop_assert!(got.iter().all(|r| r.is_err()));

        let mut p = payload::encode_vec(&env).unwrap();
        let i = at.index(p.len());
        p[i] ^= xor;
        prop_assert!(payload::decode(&p).is_err());
    }

    #[test]
    fn truncated_input_is_refused(env in arb_fitting_envelope(), at in any::<prop::sample::Index>()) {
        let p = payload::encode_vec(&env).unwrap();
        let cut = at.index(p.len());
        prop_assert!(payload::decode(&p[..cut]).is_err());
        let f = frame::encode_vec(&env).unwrap();
        let cut = at.index(f.len() - 1);
        prop_assert!(frame::decode(&f[..cut]).is_err());
    }
}

#[test]
fn garbage_without_a_zero_costs_only_the_frame_it_lands_in() {
    let a = Envelope::new("a", 1, 1, Body::Ack(Ack { of_seq: 1 })).unwrap();
    let b = Envelope::new("b", 1, 2, Body::Ack(Ack { of_seq: 2 })).unwrap();
    let mut stream = vec![0x13, 0x37, 0x42];
    stream.extend(frame::encode_vec(&a).unwrap());
    stream.extend(frame::encode_vec(&b).unwrap());
    let mut acc = Accumulator::new();
    let mut got = Vec::new();
    acc.feed(&stream, |r| got.push(r));
    assert_eq!(got.len(), 2);
    assert!(got[0].is_err(), "the frame the garbage landed in is lost");
    assert_eq!(got[1], Ok(b));
    assert_eq!(acc.stats().frames_bad, 1);
    assert_eq!(acc.stats().frames_ok, 1);
}
