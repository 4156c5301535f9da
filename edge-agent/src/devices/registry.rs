//! The device registry: every device that spoke over MQTT, with its firmware, boot, health and
//! liveness (online until its heartbeats stop for `heartbeat_timeout_ms`). In allow-list mode a
//! device not on the list is quarantined and reported, never adopted. Pure; bounded.

use std::collections::{BTreeMap, HashSet};

use firmware_proto as fp;
use serde::Serialize;
use shared::DeviceId;

use crate::mqtt::topics::DeviceKind;

/// Most devices tracked (adopted and quarantined each); past it new ones are refused.
pub const MAX_DEVICES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub kind: &'static str,
    pub firmware: Option<String>,
    pub boot_id: u32,
    pub last_seq: u32,
    pub last_seen_ms: u64,
    pub online: bool,
    /// Heartbeat periods that passed without a message, summed over the device's life.
    pub missed_heartbeats: u64,
    pub battery_pct: Option<u8>,
    pub rssi_dbm: Option<i8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A known device spoke; `came_online` when it had been offline or was new.
    Adopted { came_online: bool, new_boot: bool },
    /// Not on the allow-list: ignored, reported once.
    Quarantined { first_time: bool },
    /// The registry is full.
    Refused,
}

#[derive(Debug)]
pub struct Registry {
    allow_list: Option<HashSet<DeviceId>>,
    heartbeat_timeout_ms: u64,
    devices: BTreeMap<DeviceId, DeviceInfo>,
    quarantined: BTreeMap<DeviceId, u64>,
}

impl Registry {
    pub fn new(allow_list: Option<HashSet<DeviceId>>, heartbeat_timeout_ms: u64) -> Registry {
        Registry { allow_list, heartbeat_timeout_ms, devices: BTreeMap::new(), quarantined: BTreeMap::new() }
    }

    /// A device's message arrived at `now_ms`.
    pub fn on_message(&mut self, kind: DeviceKind, id: &DeviceId, env: &fp::Envelope, now_ms: u64) -> Seen {
        if self.allow_list.as_ref().is_some_and(|a| !a.contains(id)) {
            if let Some(n) = self.quarantined.get_mut(id) {
                *n += 1;
                return Seen::Quarantined { first_time: false };
            }
            if self.quarantined.len() >= MAX_DEVICES {
                return Seen::Refused;
            }
            self.quarantined.insert(id.clone(), 1);
            return Seen::Quarantined { first_time: true };
        }
        if !self.devices.contains_key(id) && self.devices.len() >= MAX_DEVICES {
            return Seen::Refused;
        }
        let info = self.devices.entry(id.clone()).or_insert_with(|| DeviceInfo {
            kind: kind.as_str(),
            firmware: None,
            boot_id: env.boot_id,
            last_seq: 0,
            last_seen_ms: now_ms,
            online: false,
            missed_heartbeats: 0,
            battery_pct: None,
            rssi_dbm: None,
        });
        let new_boot = info.boot_id != env.boot_id;
        info.boot_id = env.boot_id;
        info.last_seq = env.seq;
        if now_ms > info.last_seen_ms {
            info.missed_heartbeats += (now_ms - info.last_seen_ms) / self.heartbeat_timeout_ms.max(1) / 2;
        }
        info.last_seen_ms = now_ms;
        match &env.body {
            fp::Body::Hello(h) => info.firmware = Some(h.firmware.to_string()),
            fp::Body::Heartbeat(hb) => {
                info.battery_pct = hb.battery_pct;
                info.rssi_dbm = hb.rssi_dbm;
            }
            fp::Body::LabelCheckIn(c) => {
                info.battery_pct = Some(c.battery_pct);
                info.rssi_dbm = Some(c.rssi_dbm);
            }
            _ => {}
        }
        let came_online = !info.online;
        info.online = true;
        Seen::Adopted { came_online, new_boot }
    }

    /// Devices whose heartbeats stopped: now offline.
    pub fn poll(&mut self, now_ms: u64) -> Vec<DeviceId> {
        let mut gone = Vec::new();
        for (id, info) in &mut self.devices {
            if info.online && now_ms.saturating_sub(info.last_seen_ms) >= self.heartbeat_timeout_ms {
                info.online = false;
                gone.push(id.clone());
            }
        }
        gone
    }

    pub fn get(&self, id: &DeviceId) -> Option<&DeviceInfo> {
        self.devices.get(id)
    }

    /// Every adopted device, by id.
    pub fn devices(&self) -> impl Iterator<Item = (&DeviceId, &DeviceInfo)> {
        self.devices.iter()
    }

    pub fn online(&self) -> usize {
        self.devices.values().filter(|d| d.online).count()
    }

    pub fn quarantined(&self) -> impl Iterator<Item = (&DeviceId, &u64)> {
        self.quarantined.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str, boot: u32, seq: u32) -> fp::Envelope {
        fp::Envelope::new(
            id,
            boot,
            seq,
            fp::Body::Heartbeat(fp::Heartbeat { uptime_s: 1, battery_pct: Some(80), rssi_dbm: Some(-60) }),
        )
        .unwrap()
    }

    #[test]
    fn online_until_heartbeats_stop_and_reboots_are_noticed() {
        let mut r = Registry::new(None, 1_000);
        let id = DeviceId::new("esl-1").unwrap();
        assert_eq!(
            r.on_message(DeviceKind::Esl, &id, &hb("esl-1", 7, 1), 0),
            Seen::Adopted { came_online: true, new_boot: false }
        );
        assert_eq!(
            r.on_message(DeviceKind::Esl, &id, &hb("esl-1", 7, 2), 500),
            Seen::Adopted { came_online: false, new_boot: false }
        );
        assert!(r.poll(1_400).is_empty());
        assert_eq!(r.poll(1_500), vec![id.clone()]);
        assert_eq!(r.online(), 0);
        assert_eq!(
            r.on_message(DeviceKind::Esl, &id, &hb("esl-1", 8, 1), 9_000),
            Seen::Adopted { came_online: true, new_boot: true }
        );
        let info = r.get(&id).unwrap();
        assert_eq!((info.battery_pct, info.boot_id), (Some(80), 8));
        assert!(info.missed_heartbeats >= 4, "{info:?}");
    }

    #[test]
    fn unknown_devices_are_quarantined_in_allow_list_mode() {
        let known = DeviceId::new("esl-1").unwrap();
        let mut r = Registry::new(Some(HashSet::from([known.clone()])), 1_000);
        let stranger = DeviceId::new("esl-666").unwrap();
        assert_eq!(
            r.on_message(DeviceKind::Esl, &stranger, &hb("esl-666", 1, 1), 0),
            Seen::Quarantined { first_time: true }
        );
        assert_eq!(
            r.on_message(DeviceKind::Esl, &stranger, &hb("esl-666", 1, 2), 0),
            Seen::Quarantined { first_time: false }
        );
        assert!(r.get(&stranger).is_none());
        assert!(matches!(r.on_message(DeviceKind::Esl, &known, &hb("esl-1", 1, 1), 0), Seen::Adopted { .. }));
        assert_eq!(r.quarantined().collect::<Vec<_>>(), vec![(&stranger, &2)]);
    }
}
