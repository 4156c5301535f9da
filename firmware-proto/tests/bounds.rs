//! Every bound documented in SPEC.md, checked against the largest value of every message:
//! "bounded everything" (DESIGN 13.7) means each number in the spec is true.

// The tests use the std helpers (encode_vec, postcard::to_allocvec).
#![cfg(feature = "std")]

use firmware_proto::*;

fn s<const N: usize>(fill: char) -> heapless::String<N> {
    let mut out = heapless::String::new();
    while out.push(fill).is_ok() {}
    out
}

fn v<const N: usize>() -> heapless::Vec<u8, N> {
    heapless::Vec::from_slice(&[0xff; N]).unwrap()
}

fn max_read() -> TagRead {
    TagRead { epc: v(), antenna: u8::MAX, rssi_cdbm: i16::MIN, count: u16::MAX }
}

fn tag_reads(n: usize, read: TagRead) -> Body {
    Body::TagReads(TagReads { reads: (0..n).map(|_| read.clone()).collect() })
}

/// The largest value of every body (every varint at its longest, every string and vector full,
/// every option Some, the largest enum variant), with its documented bound in bytes.
fn largest() -> Vec<(Body, usize)> {
    let line = LaneDisplay::Line { line: u16::MAX, text: s('x'), quantity: i32::MIN, amount_minor: i64::MIN };
    let message = LaneDisplay::Message { code: LaneMessageCode::Error, text: s('x') };
    vec![
        (
            Body::Hello(Hello { kind: DeviceKind::Lane, firmware: s('9'), protocol_version: 1, schema_hash: u32::MAX }),
            32,
        ),
        (Body::HelloAck(HelloAck { hub_time_ms: u64::MAX }), 10),
        (Body::HelloRefused(HelloRefused { reason: RefuseReason::Schema { ours: u32::MAX, theirs: u32::MAX } }), 11),
        (Body::Ack(Ack { of_seq: u32::MAX }), 5),
        (Body::Heartbeat(Heartbeat { uptime_s: u32::MAX, battery_pct: Some(100), rssi_dbm: Some(i8::MIN) }), 9),
        (Body::Scan(Scan { symbology: s(']'), data: v() }), 101),
        (Body::Weight(Weight { grams: i32::MIN, stable: true, under_zero: true, over_capacity: true }), 8),
        (Body::LaneInput(LaneInput::SetQuantity { line: u16::MAX, quantity: u32::MAX }), 9),
        (Body::LaneDisplay(line), 60),
        (Body::LaneDisplay(message), 67),
        (Body::LaneDisplay(LaneDisplay::Receipt { receipt_id: s('r'), total_minor: i64::MIN }), 52),
        (Body::LaneDisplay(LaneDisplay::Total { amount_minor: i64::MIN, items: u16::MAX, currency: s('E') }), 18),
        (Body::LabelCheckIn(LabelCheckIn { shown_hash: u64::MAX, battery_pct: 100, rssi_dbm: i8::MIN }), 12),
        (
            Body::LabelRender(LabelRender {
                content_hash: u64::MAX,
                name: s('n'),
                price_minor: i64::MIN,
                currency: s('E'),
                promo: Some(Promo { price_minor: i64::MIN, until_ms: u64::MAX }),
                unit_price: Some(UnitPrice { price_minor: i64::MIN, per: s('k') }),
                expires_ms: u64::MAX,
            }),
            116,
        ),
        (
            Body::CommandAck(CommandAck {
                of_seq: u32::MAX,
                stage: AckStage::Failed,
                content_hash: Some(u64::MAX),
                code: u16::MAX,
            }),
            20,
        ),
        (tag_reads(TagReads::MAX_READS_ALWAYS_FIT, max_read()), 1 + 40 * TagReads::MAX_READS_ALWAYS_FIT),
        (Body::ReaderStatus(ReaderStatus { overflow: u32::MAX, temperature_c: Some(i8::MIN) }), 7),
        (
            Body::InventoryCycle(InventoryCycle {
                cycle_id: u32::MAX,
                ended: true,
                antennas: heapless::Vec::from_slice(&[u8::MAX; 16]).unwrap(),
            }),
            23,
        ),
    ]
}

/// The envelope header at its longest: version 1 + device 33 + boot_id 5 + seq 5 + msg_id 1.
const MAX_HEADER: usize = 45;

fn max_env(body: Body) -> Envelope {
    Envelope::new(&"d".repeat(DEVICE_NAME_MAX), u32::MAX, u32::MAX, body).unwrap()
}

#[test]
fn every_body_stays_within_its_documented_bound() {
    for (body, bound) in largest() {
        // The body's variant index is one byte; the bound documented on each type excludes it.
        let len = postcard::to_allocvec(&body).unwrap().len() - 1;
        assert_eq!(len, bound, "{} encodes to {len} bytes at most, documented {bound}", body.name());
    }
}

#[test]
fn the_largest_envelope_of_every_message_fits_a_payload_and_a_frame() {
    for (body, bound) in largest() {
        let name = body.name();
        let payload = payload::encode_vec(&max_env(body.clone())).unwrap();
        // Header, body variant, body, CRC.
        assert_eq!(payload.len(), MAX_HEADER + 1 + bound + 4, "{name}");
        assert!(payload.len() <= MAX_PAYLOAD, "{name}");
        let frame = frame::encode_vec(&max_env(body)).unwrap();
        assert!(frame.len() <= MAX_FRAME, "{name}");
    }
}

#[test]
fn tag_read_batches_beyond_the_guaranteed_size_are_refused_not_truncated() {
    let too_many = max_env(tag_reads(TagReads::MAX_READS_ALWAYS_FIT + 1, max_read()));
    let err = FrameError::TooLarge { msg: "tag_reads", max: MAX_PAYLOAD };
    assert_eq!(payload::encode_vec(&too_many), Err(err.clone()));
    assert_eq!(frame::encode_vec(&too_many), Err(err));
    // A full batch of SGTIN-96 reads (12-byte EPCs) fits, whatever the other values.
    let sgtin = TagRead { epc: heapless::Vec::from_slice(&[0xff; 12]).unwrap(), ..max_read() };
    let full = max_env(tag_reads(16, sgtin));
    assert_eq!(payload::encode_vec(&full).unwrap().len(), MAX_HEADER + 1 + 1 + 16 * 20 + 4);
}
