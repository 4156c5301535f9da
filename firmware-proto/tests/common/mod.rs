//! Shared proptest strategies and samples: one generator per wire type, so every test draws
//! from the same description of "any message".
#![allow(dead_code)]

use firmware_proto::*;
use proptest::prelude::*;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

pub fn unhex(s: &str) -> Vec<u8> {
    s.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

/// Any string of at most N bytes (any Unicode, truncated at a char boundary).
pub fn arb_str<const N: usize>() -> impl Strategy<Value = heapless::String<N>> {
    prop::collection::vec(any::<char>(), 0..=N).prop_map(|chars| {
        let mut s = heapless::String::new();
        for c in chars {
            if s.push(c).is_err() {
                break;
            }
        }
        s
    })
}

pub fn arb_bytes<const N: usize>() -> impl Strategy<Value = heapless::Vec<u8, N>> {
    prop::collection::vec(any::<u8>(), 0..=N).prop_map(|v| heapless::Vec::from_slice(&v).unwrap())
}

pub fn arb_device_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,32}"
}

pub fn arb_device_kind() -> impl Strategy<Value = DeviceKind> {
    prop::sample::select(DeviceKind::ALL.to_vec())
}

pub fn arb_hello() -> impl Strategy<Value = Hello> {
    (arb_device_kind(), arb_str::<24>(), any::<u8>(), any::<u32>()).prop_map(
        |(kind, firmware, protocol_version, schema_hash)| Hello { kind, firmware, protocol_version, schema_hash },
    )
}

pub fn arb_refuse_reason() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        (any::<u8>(), any::<u8>()).prop_map(|(ours, theirs)| RefuseReason::ProtocolVersion { ours, theirs }),
        (any::<u32>(), any::<u32>()).prop_map(|(ours, theirs)| RefuseReason::Schema { ours, theirs }),
        Just(RefuseReason::UnknownDevice),
    ]
}

pub fn arb_lane_input() -> impl Strategy<Value = LaneInput> {
    prop_oneof![
        Just(LaneInput::StartBasket),
        (any::<u16>(), any::<u32>()).prop_map(|(line, quantity)| LaneInput::SetQuantity { line, quantity }),
        any::<u16>().prop_map(|line| LaneInput::VoidLine { line }),
        prop_oneof![Just(TenderKind::Cash), Just(TenderKind::Card)].prop_map(LaneInput::Tender),
        Just(LaneInput::VoidBasket),
    ]
}

pub fn arb_lane_message_code() -> impl Strategy<Value = LaneMessageCode> {
    prop::sample::select(vec![
        LaneMessageCode::UnknownProduct,
        LaneMessageCode::InvalidBarcode,
        LaneMessageCode::Discontinued,
        LaneMessageCode::WaitForStableWeight,
        LaneMessageCode::ScaleError,
        LaneMessageCode::WeighedItemNeedsScale,
        LaneMessageCode::Info,
        LaneMessageCode::Error,
    ])
}

pub fn arb_lane_display() -> impl Strategy<Value = LaneDisplay> {
    prop_oneof![
        (any::<u16>(), arb_str::<40>(), any::<i32>(), any::<i64>())
            .prop_map(|(line, text, quantity, amount_minor)| LaneDisplay::Line { line, text, quantity, amount_minor }),
        any::<u16>().prop_map(|line| LaneDisplay::LineVoided { line }),
        (any::<i64>(), any::<u16>(), arb_str::<3>())
            .prop_map(|(amount_minor, items, currency)| { LaneDisplay::Total { amount_minor, items, currency } }),
        (arb_lane_message_code(), arb_str::<64>()).prop_map(|(code, text)| LaneDisplay::Message { code, text }),
        (arb_str::<40>(), any::<i64>())
            .prop_map(|(receipt_id, total_minor)| LaneDisplay::Receipt { receipt_id, total_minor }),
        Just(LaneDisplay::Cleared),
    ]
}

pub fn arb_label_render() -> impl Strategy<Value = LabelRender> {
    (
        any::<u64>(),
        arb_str::<40>(),
        any::<i64>(),
        arb_str::<3>(),
        prop::option::of(
            (any::<i64>(), any::<u64>()).prop_map(|(price_minor, until_ms)| Promo { price_minor, until_ms }),
        ),
        prop::option::of((any::<i64>(), arb_str::<8>()).prop_map(|(price_minor, per)| UnitPrice { price_minor, per })),
        any::<u64>(),
    )
        .prop_map(|(content_hash, name, price_minor, currency, promo, unit_price, expires_ms)| LabelRender {
            content_hash,
            name,
            price_minor,
            currency,
            promo,
            unit_price,
            expires_ms,
        })
}

pub fn arb_ack_stage() -> impl Strategy<Value = AckStage> {
    prop::sample::select(vec![AckStage::Queued, AckStage::Delivered, AckStage::Applied, AckStage::Failed])
}

pub fn arb_tag_read() -> impl Strategy<Value = TagRead> {
    (arb_bytes::<32>(), any::<u8>(), any::<i16>(), any::<u16>()).prop_map(|(epc, antenna, rssi_cdbm, count)| TagRead {
        epc,
        antenna,
        rssi_cdbm,
        count,
    })
}

pub fn arb_tag_reads() -> impl Strategy<Value = TagReads> {
    prop::collection::vec(arb_tag_read(), 0..=16)
        .prop_map(|v| TagReads { reads: heapless::Vec::from_slice(&v).unwrap() })
}

/// Any body, every variant equally likely.
pub fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        arb_hello().prop_map(Body::Hello),
        any::<u64>().prop_map(|hub_time_ms| Body::HelloAck(HelloAck { hub_time_ms })),
        arb_refuse_reason().prop_map(|reason| Body::HelloRefused(HelloRefused { reason })),
        any::<u32>().prop_map(|of_seq| Body::Ack(Ack { of_seq })),
        (any::<u32>(), any::<Option<u8>>(), any::<Option<i8>>()).prop_map(|(uptime_s, battery_pct, rssi_dbm)| {
            Body::Heartbeat(Heartbeat { uptime_s, battery_pct, rssi_dbm })
        }),
        (arb_str::<3>(), arb_bytes::<96>()).prop_map(|(symbology, data)| Body::Scan(Scan { symbology, data })),
        (any::<i32>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(grams, stable, under_zero, over_capacity)| Body::Weight(Weight {
                grams,
                stable,
                under_zero,
                over_capacity
            })
        ),
        arb_lane_input().prop_map(Body::LaneInput),
        arb_lane_display().prop_map(Body::LaneDisplay),
        (any::<u64>(), any::<u8>(), any::<i8>()).prop_map(|(shown_hash, battery_pct, rssi_dbm)| {
            Body::LabelCheckIn(LabelCheckIn { shown_hash, battery_pct, rssi_dbm })
        }),
        arb_label_render().prop_map(Body::LabelRender),
        (any::<u32>(), arb_ack_stage(), any::<Option<u64>>(), any::<u16>()).prop_map(
            |(of_seq, stage, content_hash, code)| Body::CommandAck(CommandAck { of_seq, stage, content_hash, code })
        ),
        arb_tag_reads().prop_map(Body::TagReads),
        (any::<u32>(), any::<Option<i8>>())
            .prop_map(|(overflow, temperature_c)| Body::ReaderStatus(ReaderStatus { overflow, temperature_c })),
        (any::<u32>(), any::<bool>(), arb_bytes::<16>()).prop_map(|(cycle_id, ended, antennas)| {
            Body::InventoryCycle(InventoryCycle { cycle_id, ended, antennas })
        }),
    ]
}

pub fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (arb_device_name(), any::<u32>(), any::<u32>(), arb_body())
        .prop_map(|(device, boot_id, seq, body)| Envelope::new(&device, boot_id, seq, body).unwrap())
}

/// Envelopes that always fit a payload (TagReads capped at MAX_READS_ALWAYS_FIT).
pub fn arb_fitting_envelope() -> impl Strategy<Value = Envelope> {
    arb_envelope().prop_map(|mut env| {
        if let Body::TagReads(t) = &mut env.body {
            t.reads.truncate(TagReads::MAX_READS_ALWAYS_FIT);
        }
        env
    })
}

fn s<const N: usize>(v: &str) -> heapless::String<N> {
    bounded_str("test", v).unwrap()
}

/// One sample of every body variant and every inner enum variant, all fields set: the
/// "witness" pinned by tests/golden.rs.
pub fn samples() -> Vec<Body> {
    vec![
        Body::Hello(Hello::new(DeviceKind::Scanner, "1.2.3").unwrap()),
        Body::HelloAck(HelloAck { hub_time_ms: 1_767_225_600_000 }),
        Body::HelloRefused(HelloRefused { reason: RefuseReason::ProtocolVersion { ours: 1, theirs: 2 } }),
        Body::HelloRefused(HelloRefused { reason: RefuseReason::Schema { ours: 0x0102_0304, theirs: 0xa0b0_c0d0 } }),
        Body::HelloRefused(HelloRefused { reason: RefuseReason::UnknownDevice }),
        Body::Ack(Ack { of_seq: 300 }),
        Body::Heartbeat(Heartbeat { uptime_s: 86_400, battery_pct: Some(87), rssi_dbm: Some(-67) }),
        Body::Heartbeat(Heartbeat { uptime_s: 5, battery_pct: None, rssi_dbm: None }),
        Body::Scan(Scan::new("]C1", b"\x1d0104006381333931\x1d3103000125").unwrap()),
        Body::Scan(Scan::new("", b"12345670").unwrap()),
        Body::Weight(Weight { grams: -20, stable: false, under_zero: true, over_capacity: false }),
        Body::Weight(Weight { grams: 30_001, stable: true, under_zero: false, over_capacity: true }),
        Body::LaneInput(LaneInput::StartBasket),
        Body::LaneInput(LaneInput::SetQuantity { line: 3, quantity: 12 }),
        Body::LaneInput(LaneInput::VoidLine { line: 2 }),
        Body::LaneInput(LaneInput::Tender(TenderKind::Cash)),
        Body::LaneInput(LaneInput::Tender(TenderKind::Card)),
        Body::LaneInput(LaneInput::VoidBasket),
        Body::LaneDisplay(LaneDisplay::Line { line: 1, text: s("Bananas"), quantity: 1_250, amount_minor: 249 }),
        Body::LaneDisplay(LaneDisplay::LineVoided { line: 1 }),
        Body::LaneDisplay(LaneDisplay::Total { amount_minor: -150, items: 4, currency: s("EUR") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::UnknownProduct, text: s("Unknown product") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::InvalidBarcode, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::Discontinued, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::WaitForStableWeight, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::ScaleError, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::WeighedItemNeedsScale, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::Info, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Message { code: LaneMessageCode::Error, text: s("") }),
        Body::LaneDisplay(LaneDisplay::Receipt { receipt_id: s("R-7-0042"), total_minor: 1_999 }),
        Body::LaneDisplay(LaneDisplay::Cleared),
        Body::LabelCheckIn(LabelCheckIn { shown_hash: 0xfeed, battery_pct: 93, rssi_dbm: -71 }),
        Body::LabelRender(LabelRender {
            content_hash: 1,
            name: s("Flour"),
            price_minor: 89,
            currency: s("EUR"),
            promo: None,
            unit_price: None,
            expires_ms: 2,
        }),
        Body::CommandAck(CommandAck { of_seq: 9, stage: AckStage::Queued, content_hash: None, code: 0 }),
        Body::CommandAck(CommandAck { of_seq: 9, stage: AckStage::Delivered, content_hash: Some(5), code: 0 }),
        Body::CommandAck(CommandAck { of_seq: 9, stage: AckStage::Applied, content_hash: Some(5), code: 0 }),
        Body::CommandAck(CommandAck { of_seq: 9, stage: AckStage::Failed, content_hash: Some(5), code: 503 }),
        Body::TagReads(TagReads {
            reads: heapless::Vec::from_slice(&[TagRead {
                epc: heapless::Vec::from_slice(&[
                    0x30, 0x14, 0x2d, 0x3a, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x07,
                ])
                .unwrap(),
                antenna: 2,
                rssi_cdbm: -5_850,
                count: 3,
            }])
            .unwrap(),
        }),
        Body::ReaderStatus(ReaderStatus { overflow: 0, temperature_c: Some(-4) }),
        Body::ReaderStatus(ReaderStatus { overflow: 12, temperature_c: None }),
        Body::InventoryCycle(InventoryCycle {
            cycle_id: 300,
            ended: false,
            antennas: heapless::Vec::from_slice(&[1, 2]).unwrap(),
        }),
        Body::InventoryCycle(InventoryCycle { cycle_id: 300, ended: true, antennas: heapless::Vec::new() }),
    ]
}
