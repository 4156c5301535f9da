//! Topic names under `se/v1/{store}/` (DESIGN section 7), built and parsed in one place.

use shared::{DeviceId, StoreId};

/// The device kinds of the topics are the protocol's own (`esl`, `scanner`, `scale`, `rfid`, `lane`).
pub use firmware_proto::DeviceKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Status,
    Evt,
    Cmd,
    Ack,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopic {
    pub kind: DeviceKind,
    pub device: DeviceId,
    pub leaf: Leaf,
}

pub fn root(store: &StoreId) -> String {
    format!("se/v1/{store}")
}

pub fn hub_state(store: &StoreId) -> String {
    format!("se/v1/{store}/hub/state")
}

/// Where the hub publishes alarms (exit gate), as JSON.
pub fn hub_alarm(store: &StoreId) -> String {
    format!("se/v1/{store}/hub/alarm")
}

pub fn device(store: &StoreId, kind: DeviceKind, device: &DeviceId, leaf: Leaf) -> String {
    let leaf = match leaf {
        Leaf::Status => "status",
        Leaf::Evt => "evt",
        Leaf::Cmd => "cmd",
        Leaf::Ack => "ack",
    };
    format!("se/v1/{store}/dev/{}/{device}/{leaf}", kind.as_str())
}

/// The subscriptions of the hub: every device's status, events and acks.
pub fn hub_subscriptions(store: &StoreId) -> Vec<String> {
    ["status", "evt", "ack"].iter().map(|leaf| format!("se/v1/{store}/dev/+/+/{leaf}")).collect()
}

/// The seven '/'-separated parts of `topic`, or `None` if it has another number of parts.
fn split_seven(topic: &str) -> Option<[&str; 7]> {
    let mut parts = [""; 7];
    let (mut n, mut start) = (0, 0);
    for (i, b) in topic.bytes().enumerate() {
        if b == b'/' {
            // '/' is ASCII: slicing beside it keeps to character boundaries.
            *parts.get_mut(n)? = &topic[start..i];
            n += 1;
            start = i + 1;
        }
    }
    *parts.get_mut(n)? = &topic[start..];
    (n == 6).then_some(parts)
}

/// Parses a device topic of this store; `Err` says what is wrong with it.
pub fn parse(store: &StoreId, topic: &str) -> Result<DeviceTopic, String> {
    // Split into exactly seven parts without allocating, scanning bytes once (this runs for
    // every message; `str::split` cost as much as the rest of the topic's checks together).
    let Some([se, v1, s, dev, kind, id, leaf]) = split_seven(topic) else {
        return Err(format!("topic {topic:?} is not se/v1/{{store}}/dev/{{kind}}/{{id}}/{{leaf}}"));
    };
    if se != "se" || v1 != "v1" || dev != "dev" {
        return Err(format!("topic {topic:?} is not a store-edge v1 device topic"));
    }
    if s != store.as_str() {
        return Err(format!("topic {topic:?} is for store {s}, not {store}"));
    }
    let kind = DeviceKind::from_name(kind).ok_or_else(|| format!("unknown device kind {kind:?} in {topic:?}"))?;
    let device = DeviceId::new(id).map_err(|e| e.to_string())?;
    let leaf = match leaf {
        "status" => Leaf::Status,
        "evt" => Leaf::Evt,
        "cmd" => Leaf::Cmd,
        "ack" => Leaf::Ack,
        other => return Err(format!("unknown leaf {other:?} in {topic:?}")),
    };
    Ok(DeviceTopic { kind, device, leaf })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let s1 = StoreId::new("s1").unwrap();
        let id = DeviceId::new("esl-42").unwrap();
        let t = device(&s1, DeviceKind::Esl, &id, Leaf::Evt);
        assert_eq!(t, "se/v1/s1/dev/esl/esl-42/evt");
        assert_eq!(parse(&s1, &t).unwrap(), DeviceTopic { kind: DeviceKind::Esl, device: id, leaf: Leaf::Evt });
        assert!(parse(&s1, "se/v1/s2/dev/esl/esl-42/evt").unwrap_err().contains("store s2"));
        assert!(parse(&s1, "se/v1/s1/dev/toaster/t1/evt").unwrap_err().contains("toaster"));
        assert!(parse(&s1, "se/v1/s1/dev/esl/bad id/evt").is_err());
        assert!(parse(&s1, "a/b").is_err());
        assert!(parse(&s1, "se/v1/s1/dev/esl/esl-42/evt/").is_err(), "eight parts");
        assert!(parse(&s1, "se/v1/s1/dev/esl/esl-42").is_err(), "six parts");
        assert!(parse(&s1, "se/v1/s1/dev/esl//evt").is_err(), "an empty id");
        assert_eq!(split_seven("a/b/c/d/e/f/g"), Some(["a", "b", "c", "d", "e", "f", "g"]));
        assert_eq!(split_seven("é/b/c/d/e/f/ü"), Some(["é", "b", "c", "d", "e", "f", "ü"]));
        assert_eq!(split_seven("//////"), Some([""; 7]));
        assert_eq!(split_seven("///////"), None);
    }
}
