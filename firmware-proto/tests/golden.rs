//! Golden bytes: the wire format, pinned. If one of these fails, the bytes on the wire changed
//! and devices built before the change will misread messages built after it. Do not just paste
//! the new bytes: follow SPEC.md "Stability" (a layout change edits SCHEMA, which changes
//! SCHEMA_HASH; an envelope or framing change bumps PROTOCOL_VERSION), update SPEC.md's worked
//! example, then update the constants here.

// The tests use the std helpers (encode_vec, postcard::to_allocvec).
#![cfg(feature = "std")]

mod common;

use common::{hex, samples, unhex};
use firmware_proto::*;

/// Pinned: any change to SCHEMA (any message type) changes it.
const GOLDEN_SCHEMA_HASH: u32 = 0xab65_28de;

#[test]
fn schema_hash_is_pinned() {
    assert_eq!(
        SCHEMA_HASH, GOLDEN_SCHEMA_HASH,
        "SCHEMA changed: SCHEMA_HASH is now {SCHEMA_HASH:#010x}. Devices built before will be \
         refused at HELLO. If intended, update GOLDEN_SCHEMA_HASH, SPEC.md and the witness bytes."
    );
    assert_eq!(PROTOCOL_VERSION, 1);
}

fn scan_env() -> Envelope {
    let scan = Scan::new("]E0", b"4006381333931").unwrap();
    Envelope::new("scanner-1", 0x1234_5678, 1, Body::Scan(scan)).unwrap()
}

fn weight_env() -> Envelope {
    let weight = Weight { grams: 1250, stable: true, under_zero: false, over_capacity: false };
    Envelope::new("scale-1", 7, 42, Body::Weight(weight)).unwrap()
}

fn hello_env() -> Envelope {
    let hello = Hello::new(DeviceKind::Esl, "2.4.1").unwrap();
    Envelope::new("esl-ap-2", 0xdead_beef, 1, Body::Hello(hello)).unwrap()
}

fn label_env() -> Envelope {
    let render = LabelRender {
        content_hash: 0x0123_4567_89ab_cdef,
        name: bounded_str("name", "Organic Milk 1L").unwrap(),
        price_minor: 129,
        currency: bounded_str("currency", "EUR").unwrap(),
        promo: Some(Promo { price_minor: 99, until_ms: 1_767_225_600_000 }),
        unit_price: Some(UnitPrice { price_minor: 129, per: bounded_str("per", "l").unwrap() }),
        expires_ms: 1_767_312_000_000,
    };
    Envelope::new("esl-0042", 3, 300, Body::LabelRender(render)).unwrap()
}

/// Encodes with both encoders (slice and Vec), compares with the golden hex, and decodes the
/// golden bytes back to the same envelope.
fn assert_frame(env: &Envelope, golden: &str) {
    let mut out = [0u8; MAX_FRAME];
    let len = frame::encode(env, &mut out).unwrap();
    assert_eq!(hex(&out[..len]), golden, "frame bytes of {}", env.body.name());
    assert_eq!(frame::encode_vec(env).unwrap(), &out[..len]);
    assert_eq!(frame::decode(&unhex(golden)).as_ref(), Ok(env));
}

fn assert_payload(env: &Envelope, golden: &str) {
    let mut out = [0u8; MAX_PAYLOAD];
    let len = payload::encode(env, &mut out).unwrap();
    assert_eq!(hex(&out[..len]), golden, "payload bytes of {}", env.body.name());
    assert_eq!(payload::encode_vec(env).unwrap(), &out[..len]);
    assert_eq!(payload::decode(&unhex(golden)).as_ref(), Ok(env));
}

#[test]
fn scan_frame() {
    assert_frame(
        &scan_env(),
        "2a 01 09 73 63 61 6e 6e 65 72 2d 31 f8 ac d1 91 01 01 10 05 03 5d 45 30 0d 34 30 30 36 \
         33 38 31 33 33 33 39 33 31 41 b3 e1 4c 00",
    );
}

/// The worked example of SPEC.md, byte by byte.
#[test]
fn weight_frame_is_the_spec_worked_example() {
    assert_payload(&weight_env(), "01 07 73 63 61 6c 65 2d 31 07 2a 11 06 c4 13 01 00 00 43 5b c7 10");
    assert_frame(&weight_env(), "11 01 07 73 63 61 6c 65 2d 31 07 2a 11 06 c4 13 01 01 05 43 5b c7 10 00");
}

#[test]
fn hello_frame_and_payload() {
    assert_payload(
        &hello_env(),
        "01 08 65 73 6c 2d 61 70 2d 32 ef fd b6 f5 0d 01 01 00 00 05 32 2e 34 2e 31 01 de d1 94 \
         db 0a 06 6a db 46",
    );
    assert_frame(
        &hello_env(),
        "12 01 08 65 73 6c 2d 61 70 2d 32 ef fd b6 f5 0d 01 01 01 11 05 32 2e 34 2e 31 01 de d1 \
         94 db 0a 06 6a db 46 00",
    );
}

#[test]
fn label_render_payload() {
    assert_payload(
        &label_env(),
        "01 08 65 73 6c 2d 30 30 34 32 03 ac 02 31 0a ef 9b af cd f8 ac d1 91 01 0f 4f 72 67 61 \
         6e 69 63 20 4d 69 6c 6b 20 31 4c 82 02 03 45 55 52 01 c6 01 80 d0 ea b6 b7 33 01 82 02 \
         01 6c 80 88 84 e0 b7 33 e6 f2 2e 9c",
    );
}

/// postcard bytes of one sample of every body variant and every inner enum variant (the body
/// alone: variant index, then fields). A failure here means a type's layout changed; SCHEMA
/// must change with it.
const WITNESS: &[&str] = &[
    "00 01 05 31 2e 32 2e 33 01 de d1 94 db 0a",
    "01 80 d0 ea b6 b7 33",
    "02 00 01 02",
    "02 01 84 86 88 08 d0 81 c3 85 0a",
    "02 02",
    "03 ac 02",
    "04 80 a3 05 01 57 01 bd",
    "04 05 00 00",
    "05 03 5d 43 31 1c 1d 30 31 30 34 30 30 36 33 38 31 33 33 33 39 33 31 1d 33 31 30 33 30 30 \
     30 31 32 35",
    "05 00 08 31 32 33 34 35 36 37 30",
    "06 27 00 01 00",
    "06 e2 d4 03 01 00 01",
    "07 00",
    "07 01 03 0c",
    "07 02 02",
    "07 03 00",
    "07 03 01",
    "07 04",
    "08 00 01 07 42 61 6e 61 6e 61 73 c4 13 f2 03",
    "08 01 01",
    "08 02 ab 02 04 03 45 55 52",
    "08 03 00 0f 55 6e 6b 6e 6f 77 6e 20 70 72 6f 64 75 63 74",
    "08 03 01 00",
    "08 03 02 00",
    "08 03 03 00",
    "08 03 04 00",
    "08 03 05 00",
    "08 03 06 00",
    "08 03 07 00",
    "08 04 08 52 2d 37 2d 30 30 34 32 9e 1f",
    "08 05",
    "09 ed fd 03 5d b9",
    "0a 01 05 46 6c 6f 75 72 b2 01 03 45 55 52 00 00 02",
    "0b 09 00 00 00",
    "0b 09 01 01 05 00",
    "0b 09 02 01 05 00",
    "0b 09 03 01 05 f7 03",
    "0c 01 0c 30 14 2d 3a 00 00 00 01 00 00 00 07 02 b3 5b 03",
    "0d 00 01 fc",
    "0d 0c 00",
    "0e ac 02 00 02 01 02",
    "0e ac 02 01 00",
];

#[test]
fn every_message_type_has_pinned_bytes() {
    let samples = samples();
    assert_eq!(samples.len(), WITNESS.len());
    for (body, golden) in samples.iter().zip(WITNESS) {
        let bytes = postcard::to_allocvec(body).unwrap();
        assert_eq!(hex(&bytes), *golden, "{} changed its wire layout: update SCHEMA (SCHEMA_HASH) first", body.name());
        assert_eq!(&postcard::from_bytes::<Body>(&unhex(golden)).unwrap(), body);
    }
}
