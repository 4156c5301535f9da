//! Round trips: every message, through both transports, comes back equal; and the frame bytes
//! are exactly "standard COBS of the payload, then 0x00" (checked against a reference COBS
//! written here from the paper, independent of the `cobs` crate).

// The tests use the std helpers (encode_vec, postcard::to_allocvec).
#![cfg(feature = "std")]

mod common;

use common::*;
use firmware_proto::*;
use proptest::prelude::*;

/// COBS as in Cheshire & Baker (and Wikipedia): groups of at most 254 non-zero bytes, each
/// preceded by its length + 1; a full group (0xFF) has no implied zero after it, and no empty
/// group is added after a full group that ends the data.
fn reference_cobs(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    let mut code_at = 0;
    let mut code = 1u8;
    for (i, &b) in data.iter().enumerate() {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xFF && i + 1 < data.len() {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
    out
}

fn assert_round_trip(env: &Envelope) -> Result<(), TestCaseError> {
    let payload = payload::encode_vec(env).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(payload.len() <= MAX_PAYLOAD);
    prop_assert_eq!(payload[0], PROTOCOL_VERSION);
    prop_assert_eq!(payload::decode(&payload), Ok(env.clone()));

    let frame = frame::encode_vec(env).unwrap();
    prop_assert!(frame.len() <= MAX_FRAME);
    let mut expected = reference_cobs(&payload);
    expected.push(0);
    prop_assert_eq!(&frame, &expected, "frame is COBS(payload) | 0x00");
    prop_assert_eq!(frame::decode(&frame), Ok(env.clone()));
    prop_assert_eq!(frame::decode(&frame[..frame.len() - 1]), Ok(env.clone()));

    let mut acc = Accumulator::new();
    let mut got = Vec::new();
    acc.feed(&frame, |r| got.push(r));
    prop_assert_eq!(got, vec![Ok(env.clone())]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn every_body_round_trips_through_frame_and_payload(env in arb_envelope()) {
        match payload::encode_vec(&env) {
            Err(FrameError::TooLarge { msg, max }) => {
                // Only a batch of many long EPCs can exceed the payload bound.
                prop_assert_eq!(msg, "tag_reads");
                prop_assert_eq!(max, MAX_PAYLOAD);
                let Body::TagReads(t) = &env.body else { unreachable!() };
                prop_assert!(t.reads.len() > TagReads::MAX_READS_ALWAYS_FIT);
                prop_assert_eq!(
                    frame::encode_vec(&env),
                    Err(FrameError::TooLarge { msg: "tag_reads", max: MAX_PAYLOAD })
                );
            }
            _ => assert_round_trip(&env)?,
        }
    }

    #[test]
    fn long_runs_without_zeros_frame_correctly(
        epcs in prop::collection::vec(prop::collection::vec(1u8..=255, 32), 10),
        device in arb_device_name(),
    ) {
        // 10 reads of 32 non-zero bytes: runs longer than one COBS group (254 bytes) are likely.
        let reads = epcs.iter().map(|epc| TagRead {
            epc: heapless::Vec::from_slice(epc).unwrap(),
            antenna: 1,
            rssi_cdbm: -100,
            count: 1,
        }).collect::<Vec<_>>();
        let body = Body::TagReads(TagReads { reads: heapless::Vec::from_slice(&reads).unwrap() });
        assert_round_trip(&Envelope::new(&device, 0x0101_0101, 0x0101_0101, body).unwrap())?;
    }
}

#[test]
fn every_sample_round_trips_and_every_variant_is_sampled() {
    let mut ids: Vec<u16> = Vec::new();
    for (i, body) in samples().into_iter().enumerate() {
        ids.push(body.msg_id());
        let env = Envelope::new("dev-1", 99, i as u32 + 1, body).unwrap();
        assert_round_trip(&env).unwrap();
    }
    ids.dedup();
    let all: Vec<u16> = MESSAGES.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, all, "samples cover every Body variant, in order");
}

#[test]
fn reference_cobs_matches_the_paper_examples() {
    assert_eq!(reference_cobs(&[]), [0x01]);
    assert_eq!(reference_cobs(&[0x00]), [0x01, 0x01]);
    assert_eq!(reference_cobs(&[0x11, 0x22, 0x00, 0x33]), [0x03, 0x11, 0x22, 0x02, 0x33]);
    let run: Vec<u8> = (1..=254).collect();
    let mut expected = vec![0xFF];
    expected.extend(&run);
    assert_eq!(reference_cobs(&run), expected);
    let run: Vec<u8> = (1..=255).collect();
    let mut expected = vec![0xFF];
    expected.extend(1..=254);
    expected.extend([0x02, 0xFF]);
    assert_eq!(reference_cobs(&run), expected);
}
