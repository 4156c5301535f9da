//! The decoder's rules, one test each, in the order the decoder applies them: bounds, CRC,
//! version byte (before the body), body, trailing bytes, envelope rules. And the encoder refuses
//! what the decoder would refuse.

// The tests use the std helpers (encode_vec, postcard::to_allocvec).
#![cfg(feature = "std")]

use std::error::Error as _;

use firmware_proto::*;

fn ack() -> Envelope {
    Envelope::new("lane-1", 5, 9, Body::Ack(Ack { of_seq: 8 })).unwrap()
}

/// postcard bytes of `value` (any type, so tests can forge envelopes) plus the CRC trailer.
fn forge<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = postcard::to_allocvec(value).unwrap();
    bytes.extend(payload::crc32c(&bytes).to_le_bytes());
    bytes
}

fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.extend(payload::crc32c(&bytes).to_le_bytes());
    bytes
}

#[test]
fn an_unknown_version_is_refused_before_the_body_is_read() {
    // Version 2 followed by bytes that are no envelope at all: the version is what is reported.
    let bytes = with_crc(vec![2, 0xff, 0xff, 0xff]);
    let err = payload::decode(&bytes).unwrap_err();
    assert_eq!(err, FrameError::UnsupportedVersion { found: 2, supported: 1 });
    let msg = err.to_string();
    assert!(msg.contains("version 2") && msg.contains("version 1"), "{msg}");
    // Same through a frame, and for a valid v1 envelope relabelled as v0.
    let mut env = payload::encode_vec(&ack()).unwrap();
    env.truncate(env.len() - 4);
    env[0] = 0;
    let bytes = with_crc(env);
    assert_eq!(payload::decode(&bytes), Err(FrameError::UnsupportedVersion { found: 0, supported: 1 }));
}

#[test]
fn a_corrupted_payload_is_reported_as_a_crc_error_not_a_version_error() {
    let mut bytes = payload::encode_vec(&ack()).unwrap();
    bytes[0] = 9;
    assert!(matches!(payload::decode(&bytes), Err(FrameError::Crc { .. })));
}

#[test]
fn trailing_bytes_after_the_envelope_are_refused() {
    let mut bytes = payload::encode_vec(&ack()).unwrap();
    bytes.truncate(bytes.len() - 4);
    bytes.extend([0x00, 0x00]);
    let err = payload::decode(&with_crc(bytes)).unwrap_err();
    assert_eq!(err, FrameError::TrailingBytes { count: 2 });
}

#[test]
fn a_body_that_does_not_decode_is_a_postcard_error() {
    // Version 1, device "a", boot 1, seq 1, msg_id 0x04, then body variant 14 (no such variant).
    let bytes = with_crc(vec![1, 1, b'a', 1, 1, 0x04, 14]);
    let err = payload::decode(&bytes).unwrap_err();
    assert!(matches!(err, FrameError::Postcard(_)), "{err:?}");
    assert!(err.source().is_some());
    assert!(err.to_string().starts_with("envelope does not decode"), "{err}");
}

#[test]
fn a_msg_id_that_does_not_match_the_body_is_refused() {
    let mut env = ack();
    env.msg_id = 0x10;
    let err = payload::decode(&forge(&env)).unwrap_err();
    assert_eq!(err, FrameError::Invalid(ProtoError::MsgIdMismatch { msg_id: 0x10, body: 0x04 }));
    assert_eq!(payload::encode_vec(&env), Err(err.clone()));
    assert_eq!(frame::encode_vec(&env), Err(err));
}

#[test]
fn an_invalid_device_name_is_refused_on_the_wire_and_when_encoding() {
    let mut env = ack();
    env.device = bounded_str("device", "se/v1/#").unwrap();
    let expected = FrameError::Invalid(ProtoError::DeviceNameByte { byte: b'/', index: 2 });
    assert_eq!(payload::decode(&forge(&env)), Err(expected.clone()));
    assert_eq!(payload::encode_vec(&env), Err(expected));
    env.device.clear();
    assert_eq!(payload::encode_vec(&env), Err(FrameError::Invalid(ProtoError::EmptyDeviceName)));
}

#[test]
fn the_encoder_refuses_another_version() {
    let mut env = ack();
    env.version = 2;
    assert_eq!(payload::encode_vec(&env), Err(FrameError::UnsupportedVersion { found: 2, supported: 1 }));
}

#[test]
fn lengths_are_bounded_on_both_ends() {
    assert_eq!(payload::decode(&[]), Err(FrameError::Empty));
    assert_eq!(payload::decode(&[1, 0, 0, 0]), Err(FrameError::Truncated { len: 4 }));
    assert_eq!(payload::decode(&[1; MAX_PAYLOAD + 1]), Err(FrameError::Oversized));
    assert_eq!(frame::decode(&[1; MAX_FRAME]), Err(FrameError::Oversized));
    let mut out = [0u8; 4];
    let needed = payload::encode_vec(&ack()).unwrap().len();
    assert_eq!(payload::encode(&ack(), &mut out), Err(FrameError::BufferTooSmall { needed, available: 4 }));
}

#[test]
fn bad_cobs_is_reported_as_such() {
    // A code byte announcing more bytes than the frame has.
    assert_eq!(frame::decode(&[0x05, 0x01, 0x00]), Err(FrameError::Cobs));
    // A 0x00 inside the frame.
    assert_eq!(frame::decode(&[0x02, 0x01, 0x00, 0x01, 0x00]), Err(FrameError::Cobs));
}

#[test]
fn errors_say_what_happened() {
    let cases: Vec<(FrameError, &str)> = vec![
        (FrameError::Crc { computed: 1, received: 2 }, "CRC-32C mismatch: computed 0x00000001, received 0x00000002"),
        (FrameError::Oversized, "oversized frame discarded"),
        (
            FrameError::TooLarge { msg: "tag_reads", max: 480 },
            "tag_reads message is larger than the 480-byte payload limit; split it",
        ),
        (FrameError::Cobs, "invalid COBS encoding"),
        (FrameError::TrailingBytes { count: 3 }, "3 unexpected bytes"),
        (FrameError::Invalid(ProtoError::EmptyDeviceName), "invalid envelope: device name is empty"),
    ];
    for (err, text) in cases {
        assert!(err.to_string().contains(text), "{err} should contain {text:?}");
    }
    assert!(FrameError::Invalid(ProtoError::EmptyDeviceName).source().is_some());
    assert_eq!(
        link::WindowFull.to_string(),
        "send window full: every slot awaits an ack; retry after acks or timeouts"
    );
}
