//! Adapter for the Impinj IoT device interface: JSON `tagInventory` events (`epcHex`,
//! `antennaPort`, `peakRssiCdbm`, first/last seen) published by Impinj readers. A payload may
//! hold one event, an array of events, or one event per line. Other event types are counted and
//! skipped; a malformed event is refused with the line and field, and the rest still count.

use serde::Deserialize;

/// Largest payload accepted, in bytes; larger ones are refused whole.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Longest EPC accepted, in bytes (496-bit EPCs exist; SGTIN-96 is 12).
pub const MAX_EPC_BYTES: usize = 62;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpinjRead {
    pub epc: Vec<u8>,
    pub antenna: u8,
    pub peak_rssi_cdbm: Option<i16>,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub reads: Vec<ImpinjRead>,
    /// Well-formed events of other types (antenna connected, inventory status, ...).
    pub other_events: usize,
    /// Refused events, each naming where and what.
    pub errors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    event_type: Option<String>,
    tag_inventory_event: Option<TagInventory>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TagInventory {
    epc_hex: Option<String>,
    antenna_port: Option<i64>,
    peak_rssi_cdbm: Option<i64>,
    first_seen_time: Option<String>,
    last_seen_time: Option<String>,
}

fn hex_bytes(hex: &str) -> Result<Vec<u8>, String> {
    if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > MAX_EPC_BYTES * 2 {
        return Err(format!(
            "epcHex has {} hex digits; expected an even number from 2 to {}",
            hex.len(),
            MAX_EPC_BYTES * 2
        ));
    }
    hex.as_bytes()
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| "epcHex is not hexadecimal".to_owned())
        })
        .collect()
}

fn convert(event: Event) -> Result<Option<ImpinjRead>, String> {
    if event.event_type.as_deref() != Some("tagInventory") {
        return Ok(None);
    }
    let tag = event.tag_inventory_event.ok_or("tagInventory event without tagInventoryEvent")?;
    let epc = hex_bytes(tag.epc_hex.as_deref().ok_or("tagInventoryEvent without epcHex")?)?;
    let antenna = match tag.antenna_port {
        None => 0,
        Some(p) => u8::try_from(p).map_err(|_| format!("antennaPort {p} is out of range"))?,
    };
    let peak_rssi_cdbm = tag
        .peak_rssi_cdbm
        .map(|r| i16::try_from(r).map_err(|_| format!("peakRssiCdbm {r} is out of range")))
        .transpose()?;
    Ok(Some(ImpinjRead {
        epc,
        antenna,
        peak_rssi_cdbm,
        first_seen: tag.first_seen_time,
        last_seen: tag.last_seen_time,
    }))
}

fn take(where_: String, value: Result<Event, serde_json::Error>, parsed: &mut Parsed) {
    match value {
        Err(e) => parsed.errors.push(format!("{where_}: {e}")),
        Ok(event) => match convert(event) {
            Ok(Some(read)) => parsed.reads.push(read),
            Ok(None) => parsed.other_events += 1,
            Err(e) => parsed.errors.push(format!("{where_}: {e}")),
        },
    }
}

/// Parses a payload of Impinj events.
pub fn parse(payload: &[u8]) -> Parsed {
    let mut parsed = Parsed::default();
    if payload.len() > MAX_PAYLOAD {
        parsed.errors.push(format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len()));
        return parsed;
    }
    let trimmed = payload.iter().position(|b| !b.is_ascii_whitespace()).map(|i| &payload[i..]).unwrap_or(&[]);
    if trimmed.first() == Some(&b'[') {
        match serde_json::from_slice::<Vec<serde_json::Value>>(trimmed) {
            Ok(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    take(format!("event {}", i + 1), serde_json::from_value(item), &mut parsed);
                }
            }
            Err(e) => parsed.errors.push(format!("array: {e}")),
        }
        return parsed;
    }
    for (n, line) in payload.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        take(format!("line {}", n + 1), serde_json::from_slice(line), &mut parsed);
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EVENT: &str = r#"{"timestamp":"2026-11-23T01:00:00.000+0000","hostname":"impinj-14-f5-b2","eventType":"tagInventory","tagInventoryEvent":{"epcHex":"3074257BF7194E4000001A85","antennaPort":2,"antennaName":"Antenna 2","peakRssiCdbm":-5400,"firstSeenTime":"2026-11-23T00:59:59.900Z","lastSeenTime":"2026-11-23T01:00:00.000Z"}}"#;

    #[test]
    fn reads_a_tag_inventory_event_in_every_framing() {
        let one = parse(EVENT.as_bytes());
        assert_eq!(one.reads.len(), 1);
        let r = &one.reads[0];
        assert_eq!((r.antenna, r.peak_rssi_cdbm), (2, Some(-5400)));
        assert_eq!(shared::decode_sgtin96(&r.epc).unwrap().gtin.to_string(), "80614141123458");
        let lines = parse(format!("{EVENT}\n{{\"eventType\":\"antennaConnected\"}}\n\n{EVENT}\n").as_bytes());
        assert_eq!((lines.reads.len(), lines.other_events, lines.errors.len()), (2, 1, 0));
        let array = parse(format!("[{EVENT},{EVENT}]").as_bytes());
        assert_eq!(array.reads.len(), 2);
    }

    #[test]
    fn bad_events_are_refused_by_line_and_the_rest_count() {
        let p = parse(
            format!("{EVENT}\nnot json\n{{\"eventType\":\"tagInventory\",\"tagInventoryEvent\":{{\"epcHex\":\"XYZ1\"}}}}\n{EVENT}").as_bytes(),
        );
        assert_eq!(p.reads.len(), 2);
        assert_eq!(p.errors.len(), 2);
        assert!(p.errors[0].starts_with("line 2: "), "{:?}", p.errors);
        assert!(p.errors[1].starts_with("line 3: ") && p.errors[1].contains("hexadecimal"), "{:?}", p.errors);
        let truncated = parse(&EVENT.as_bytes()[..EVENT.len() / 2]);
        assert_eq!((truncated.reads.len(), truncated.errors.len()), (0, 1));
        let huge = parse(&vec![b' '; MAX_PAYLOAD + 1]);
        assert!(huge.errors[0].contains("exceeds"));
        let port = parse(br#"{"eventType":"tagInventory","tagInventoryEvent":{"epcHex":"30","antennaPort":300}}"#);
        assert!(port.errors[0].contains("antennaPort 300"));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), text in "\\PC{0,200}") {
            let _ = parse(&bytes);
            let _ = parse(text.as_bytes());
        }
    }
}
