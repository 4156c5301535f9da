//! The device registry: every device that spoke over MQTT, with its firmware, boot, health and
//! liveness (online until its heartbeats stop for `heartbeat_timeout_ms`). In allow-list mode a
//! device not on the list is quarantined and reported, never adopted. It remembers which
//! entries changed, so its owner (the MQTT router) can persist them in batches
//! ([`super::registry_store`]), and it can be restored from what was persisted: restored
//! devices are known at once and shown offline until heard. Pure; bounded.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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
    /// When it was last heard, Unix ms (wall clock, so it means something across restarts).
    pub last_seen_ms: u64,
    pub online: bool,
    /// Heartbeat periods that passed without a message, summed over the device's life.
    pub missed_heartbeats: u64,
    pub battery_pct: Option<u8>,
    pub rssi_dbm: Option<i8>,
}

/// What the registry keeps of one message: its sender's boot and sequence, and the body.
#[derive(Debug, Clone, Copy)]
pub struct Heard<'a> {
    pub boot_id: u32,
    pub seq: u32,
    /// `None` when the body was not decoded into a [`fp::Body`] (tag reads read in place).
    pub body: Option<&'a fp::Body>,
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

/// When a message arrived: a monotonic clock for liveness (wall-clock steps do not make devices
/// look dead or alive), the wall clock for what is shown and persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// What changed since the last [`Registry::take_changes`]: the entries to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub devices: Vec<(DeviceId, DeviceInfo)>,
    pub quarantined: Vec<(DeviceId, u64)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.quarantined.is_empty()
    }
}

#[derive(Debug)]
pub struct Registry {
    allow_list: Option<HashSet<DeviceId>>,
    heartbeat_timeout_ms: u64,
    devices: BTreeMap<DeviceId, DeviceInfo>,
    quarantined: BTreeMap<DeviceId, u64>,
    /// When each device was last heard in this run (monotonic ms); restored devices have none.
    /// Looked up for every message: hashed with foldhash, keyed per process (device names come
    /// from topics anyone on the broker may publish to).
    heard: HashMap<DeviceId, u64, foldhash::fast::RandomState>,
    changed: BTreeSet<DeviceId>,
    changed_quarantined: BTreeSet<DeviceId>,
}

impl Registry {
    pub fn new(allow_list: Option<HashSet<DeviceId>>, heartbeat_timeout_ms: u64) -> Registry {
        Registry {
            allow_list,
            heartbeat_timeout_ms,
            devices: BTreeMap::new(),
            quarantined: BTreeMap::new(),
            heard: HashMap::default(),
            changed: BTreeSet::new(),
            changed_quarantined: BTreeSet::new(),
        }
    }

    fn admits(&self, id: &DeviceId) -> bool {
        self.allow_list.as_ref().is_none_or(|a| a.contains(id))
    }

    /// Restores persisted entries (before any message): devices are shown offline until heard;
    /// quarantined devices stay quarantined while the allow-list still leaves them out (those
    /// it now admits are dropped from the list and adopted when they speak). Returns how many
    /// quarantined entries were released that way. Entries past [`MAX_DEVICES`] are ignored.
    pub fn restore(&mut self, devices: Vec<(DeviceId, DeviceInfo)>, quarantined: Vec<(DeviceId, u64)>) -> usize {
        for (id, mut info) in devices {
            if self.devices.len() >= MAX_DEVICES {
                break;
            }
            info.online = false;
            self.devices.insert(id, info);
        }
        let mut released = 0;
        for (id, n) in quarantined {
            if self.admits(&id) {
                released += 1;
                // Persisted as gone (a count of 0 deletes the row).
                self.changed_quarantined.insert(id);
            } else if self.quarantined.len() < MAX_DEVICES {
                self.quarantined.insert(id, n);
            }
        }
        released
    }

    /// A device's message arrived at `now`.
    pub fn on_message(&mut self, kind: DeviceKind, id: &DeviceId, env: &fp::Envelope, now: Now) -> Seen {
        self.on_heard(kind, id, Heard { boot_id: env.boot_id, seq: env.seq, body: Some(&env.body) }, now)
    }

    /// [`Registry::on_message`] for a message known only by its header (a reader's tag reads,
    /// decoded in place): what the registry keeps of a body (firmware, battery, signal) comes
    /// only with hello, heartbeat and check-in messages.
    pub fn on_heard(&mut self, kind: DeviceKind, id: &DeviceId, heard: Heard<'_>, now: Now) -> Seen {
        if !self.admits(id) {
            if let Some(n) = self.quarantined.get_mut(id) {
                *n += 1;
                self.changed_quarantined.insert(id.clone());
                return Seen::Quarantined { first_time: false };
            }
            if self.quarantined.len() >= MAX_DEVICES {
                return Seen::Refused;
            }
            self.quarantined.insert(id.clone(), 1);
            self.changed_quarantined.insert(id.clone());
            return Seen::Quarantined { first_time: true };
        }
        // Lookups first: the id is cloned only for a device not seen before (this runs for
        // every message, tag reads included).
        if !self.devices.contains_key(id) {
            if self.devices.len() >= MAX_DEVICES {
                return Seen::Refused;
            }
            let info = DeviceInfo {
                kind: kind.as_str(),
                firmware: None,
                boot_id: heard.boot_id,
                last_seq: 0,
                last_seen_ms: now.wall_ms,
                online: false,
                missed_heartbeats: 0,
                battery_pct: None,
                rssi_dbm: None,
            };
            self.devices.insert(id.clone(), info);
        }
        let Some(info) = self.devices.get_mut(id) else { return Seen::Refused };
        let new_boot = info.boot_id != heard.boot_id;
        info.kind = kind.as_str();
        info.boot_id = heard.boot_id;
        info.last_seq = heard.seq;
        // Silence since it was last heard: in this run by the monotonic clock; for a device
        // restored from before a restart, by the wall clock.
        let silent_ms = match self.heard.get_mut(id) {
            Some(heard) => now.mono_ms.saturating_sub(std::mem::replace(heard, now.mono_ms)),
            None => {
                self.heard.insert(id.clone(), now.mono_ms);
                now.wall_ms.saturating_sub(info.last_seen_ms)
            }
        };
        info.missed_heartbeats += silent_ms / self.heartbeat_timeout_ms.max(1) / 2;
        info.last_seen_ms = now.wall_ms;
        match heard.body {
            Some(fp::Body::Hello(h)) => info.firmware = Some(h.firmware.to_string()),
            Some(fp::Body::Heartbeat(hb)) => {
                info.battery_pct = hb.battery_pct;
                info.rssi_dbm = hb.rssi_dbm;
            }
            Some(fp::Body::LabelCheckIn(c)) => {
                info.battery_pct = Some(c.battery_pct);
                info.rssi_dbm = Some(c.rssi_dbm);
            }
            _ => {}
        }
        let came_online = !info.online;
        info.online = true;
        if !self.changed.contains(id) {
            self.changed.insert(id.clone());
        }
        Seen::Adopted { came_online, new_boot }
    }

    /// Devices whose heartbeats stopped (by the monotonic clock `now_mono_ms`): now offline.
    pub fn poll(&mut self, now_mono_ms: u64) -> Vec<DeviceId> {
        let mut gone = Vec::new();
        for (id, info) in &mut self.devices {
            let heard = self.heard.get(id).copied().unwrap_or(0);
            if info.online && now_mono_ms.saturating_sub(heard) >= self.heartbeat_timeout_ms {
                info.online = false;
                gone.push(id.clone());
            }
        }
        gone
    }

    /// The entries changed since the last call (a quarantined entry with 0 messages was
    /// released), and forgets that they changed.
    pub fn take_changes(&mut self) -> Changes {
        let devices = std::mem::take(&mut self.changed)
            .into_iter()
            .filter_map(|id| self.devices.get(&id).map(|info| (id, info.clone())))
            .collect();
        let quarantined = std::mem::take(&mut self.changed_quarantined)
            .into_iter()
            .map(|id| {
                let n = self.quarantined.get(&id).copied().unwrap_or(0);
                (id, n)
            })
            .collect();
        Changes { devices, quarantined }
    }

    /// Marks these entries changed again (their write could not be queued).
    pub fn unsaved(&mut self, changes: Changes) {
        self.changed.extend(changes.devices.into_iter().map(|(id, _)| id));
        self.changed_quarantined.extend(changes.quarantined.into_iter().map(|(id, _)| id));
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

    /// A monotonic instant and a wall clock 1.7e12 ms later (some day in 2023).
    fn at(mono_ms: u64) -> Now {
        Now { mono_ms, wall_ms: 1_700_000_000_000 + mono_ms }
    }

    #[test]
    fn online_until_heartbeats_stop_and_reboots_are_noticed() {
        let mut r = Registry::new(None, 1_000);
        let id = DeviceId::new("esl-1").unwrap();
        assert_eq!(
            r.on_message(DeviceKind::Esl, &id, &hb("esl-1", 7, 1), at(0)),
            Seen::Adopted { came_online: true, new_boot: false }
        );
        assert_eq!(
            r.on_message(DeviceKind::Esl, &id, &hb("esl-1", 7, 2), at(500)),
            Seen::Adopted { came_online: false, new_boot: false }
        );
        assert!(r.poll(1_400).is_empty());
        assert_eq!(r.poll(1_500), vec![id.clone()]);
        assert_eq!(r.online(), 0);
        assert_eq!(
            r.on_message(DeviceKind::Esl, &id, &hb("esl-1", 8, 1), at(9_000)),
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
            r.on_message(DeviceKind::Esl, &stranger, &hb("esl-666", 1, 1), at(0)),
            Seen::Quarantined { first_time: true }
        );
        assert_eq!(
            r.on_message(DeviceKind::Esl, &stranger, &hb("esl-666", 1, 2), at(0)),
            Seen::Quarantined { first_time: false }
        );
        assert!(r.get(&stranger).is_none());
        assert!(matches!(r.on_message(DeviceKind::Esl, &known, &hb("esl-1", 1, 1), at(0)), Seen::Adopted { .. }));
        assert_eq!(r.quarantined().collect::<Vec<_>>(), vec![(&stranger, &2)]);
    }

    #[test]
    fn changes_are_handed_out_once_and_a_restored_registry_knows_its_devices_offline() {
        let known = DeviceId::new("esl-1").unwrap();
        let stranger = DeviceId::new("esl-666").unwrap();
        let allow = Some(HashSet::from([known.clone()]));
        let mut r = Registry::new(allow.clone(), 1_000);
        r.on_message(DeviceKind::Esl, &known, &hb("esl-1", 7, 1), at(0));
        r.on_message(DeviceKind::Esl, &stranger, &hb("esl-666", 1, 1), at(0));
        let changes = r.take_changes();
        assert_eq!((changes.devices.len(), changes.quarantined.clone()), (1, vec![(stranger.clone(), 1)]));
        assert!(r.take_changes().is_empty(), "handed out once");
        r.unsaved(changes.clone());
        assert_eq!(r.take_changes(), changes, "a write that could not be queued is retried");

        // After a restart: known at once, offline until heard, the stranger still quarantined.
        let mut after = Registry::new(allow, 1_000);
        assert_eq!(after.restore(changes.devices.clone(), changes.quarantined.clone()), 0);
        assert_eq!(after.get(&known).map(|d| (d.online, d.battery_pct)), Some((false, Some(80))));
        assert_eq!(after.quarantined().count(), 1);
        assert!(after.poll(10_000).is_empty(), "a restored device is not reported offline again");
        // Heard again ten heartbeat timeouts later (by the wall clock): came online, missed five.
        let later = Now { mono_ms: 5, wall_ms: at(0).wall_ms + 10_000 };
        assert_eq!(
            after.on_message(DeviceKind::Esl, &known, &hb("esl-1", 7, 2), later),
            Seen::Adopted { came_online: true, new_boot: false }
        );
        assert_eq!(after.get(&known).unwrap().missed_heartbeats, 5);

        // With the allow-list gone, the stranger is released (and its row deleted).
        let mut open = Registry::new(None, 1_000);
        assert_eq!(open.restore(changes.devices, changes.quarantined), 1);
        assert_eq!(open.quarantined().count(), 0);
        assert_eq!(open.take_changes().quarantined, vec![(stranger, 0)]);
    }
}
