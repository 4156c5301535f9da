//! Tag presence per zone (a reader's antenna): repeated reads of a tag in its zone within the
//! dedup window are one sighting; a tag seen in a new zone has arrived (or moved); a tag not
//! seen for `depart_after_ms` has departed. A snapshot of a zone groups its present SGTIN tags
//! by GTIN; other EPCs are counted apart (the counts that become stock counts are inventory
//! cycles: [`super::cycle`]). An exit-gate zone raises an alarm for a tag whose EPC was not
//! recorded as sold. A read is taken by reference and costs no allocation unless the tag is new
//! (this is the hot path of RFID ingest).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use shared::{decode_sgtin96, Gtin};

/// A reader antenna: where a tag was seen. The reader's name is shared, so a zone is copied
/// into every tag it holds without an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone {
    pub reader: Arc<str>,
    pub antenna: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRead<'a> {
    pub epc: &'a [u8],
    pub zone: &'a Zone,
    pub at_ms: u64,
}

/// What one read meant for its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// Read again in its zone within the dedup window.
    Duplicate,
    /// Read again in its zone after the window.
    Again,
    /// A tag not tracked before.
    Arrived,
    /// Seen before in another zone.
    Moved { from: Zone },
    /// A new tag while the table is full: not tracked (`stats.dropped`).
    Dropped,
}

/// A read's outcome: what it meant, and the exit alarm it raised, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOutcome {
    pub sighting: Sighting,
    pub alarm: Option<PresenceEvent>,
}

/// What presence reports beyond a read's own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Departed {
        epc: Vec<u8>,
        zone: Zone,
    },
    /// A tag in an exit zone that was not sold.
    ExitAlarm {
        epc: Vec<u8>,
        zone: Zone,
        gtin: Option<Gtin>,
        serial: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct PresenceConfig {
    /// Reads of a tag in the same zone closer than this are duplicates.
    pub dedup_window_ms: u64,
    /// A tag not read for this long has departed.
    pub depart_after_ms: u64,
    /// Most tags tracked; past it new tags are refused and counted (`dropped`).
    pub max_tags: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig { dedup_window_ms: 2_000, depart_after_ms: 60_000, max_tags: 200_000 }
    }
}

/// An EPC as a table key: the 12 bytes of an SGTIN-96 (nearly every retail tag) held inline,
/// longer EPCs on the heap. Inline keys spare an allocation per new tag and a pointer chase per
/// lookup (measured: `cargo bench -p e2e-tests --bench mqtt_ingest`). Hashes and compares as
/// its bytes, so the table is searched with a plain `&[u8]`.
#[derive(Debug, Clone)]
enum EpcKey {
    Inline([u8; 12]),
    Heap(Box<[u8]>),
}

impl EpcKey {
    fn new(epc: &[u8]) -> EpcKey {
        match <[u8; 12]>::try_from(epc) {
            Ok(bytes) => EpcKey::Inline(bytes),
            Err(_) => EpcKey::Heap(epc.into()),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            EpcKey::Inline(b) => b,
            EpcKey::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for EpcKey {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for EpcKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for EpcKey {}

impl std::hash::Hash for EpcKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Exactly as `[u8]` hashes, as `Borrow` requires.
        self.as_slice().hash(state);
    }
}

#[derive(Debug, Clone)]
struct Seen {
    zone: Zone,
    last_ms: u64,
    /// When the tag arrived in `zone`, in the order of arrivals (see [`Presence::arrival_mark`]).
    arrival: u64,
}

/// Totals for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub reads: u64,
    pub duplicates: u64,
    pub dropped: u64,
}

#[derive(Debug, Default)]
pub struct Presence {
    config: PresenceConfig,
    tags: HashMap<EpcKey, Seen>,
    exit_zones: HashSet<Zone>,
    /// Arrivals and moves so far: an ordering of "came into its zone" that needs no clock.
    arrivals: u64,
    pub stats: PresenceStats,
}

/// A zone's cycle count: units per GTIN, and tags that are not SGTIN-96.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZoneCount {
    pub by_gtin: BTreeMap<Gtin, u64>,
    pub not_sgtin: u64,
}

impl Presence {
    pub fn new(config: PresenceConfig, exit_zones: impl IntoIterator<Item = Zone>) -> Presence {
        Presence { config, exit_zones: exit_zones.into_iter().collect(), ..Presence::default() }
    }

    /// One read; `sold` says whether an EPC was recorded as sold (for the exit gate, asked only
    /// when the tag came into an exit zone).
    pub fn on_read(&mut self, read: TagRead<'_>, sold: impl Fn(&[u8]) -> bool) -> ReadOutcome {
        self.stats.reads += 1;
        let sighting = match self.tags.get_mut(read.epc) {
            Some(seen) if seen.zone == *read.zone => {
                let duplicate = read.at_ms.saturating_sub(seen.last_ms) < self.config.dedup_window_ms;
                seen.last_ms = seen.last_ms.max(read.at_ms);
                let sighting = if duplicate {
                    self.stats.duplicates += 1;
                    Sighting::Duplicate
                } else {
                    Sighting::Again
                };
                return ReadOutcome { sighting, alarm: None };
            }
            Some(seen) => {
                let from = std::mem::replace(&mut seen.zone, read.zone.clone());
                seen.last_ms = read.at_ms;
                self.arrivals += 1;
                seen.arrival = self.arrivals;
                Sighting::Moved { from }
            }
            None => {
                if self.tags.len() >= self.config.max_tags {
                    self.stats.dropped += 1;
                    return ReadOutcome { sighting: Sighting::Dropped, alarm: None };
                }
                self.arrivals += 1;
                let seen = Seen { zone: read.zone.clone(), last_ms: read.at_ms, arrival: self.arrivals };
                self.tags.insert(EpcKey::new(read.epc), seen);
                Sighting::Arrived
            }
        };
        let alarm =
            (!self.exit_zones.is_empty() && self.exit_zones.contains(read.zone) && !sold(read.epc)).then(|| {
                let decoded = decode_sgtin96(read.epc).ok();
                PresenceEvent::ExitAlarm {
                    epc: read.epc.to_vec(),
                    zone: read.zone.clone(),
                    gtin: decoded.map(|s| s.gtin),
                    serial: decoded.map(|s| s.serial),
                }
            });
        ReadOutcome { sighting, alarm }
    }

    /// Tags not seen for `depart_after_ms` have departed.
    pub fn poll(&mut self, now_ms: u64) -> Vec<PresenceEvent> {
        let depart_after_ms = self.config.depart_after_ms;
        let mut gone = Vec::new();
        self.tags.retain(|epc, s| {
            let stays = now_ms.saturating_sub(s.last_ms) < depart_after_ms;
            if !stays {
                gone.push((epc.as_slice().to_vec(), s.zone.clone()));
            }
            stays
        });
        gone.sort();
        gone.into_iter().map(|(epc, zone)| PresenceEvent::Departed { epc, zone }).collect()
    }

    /// The tags present in `zone` now.
    pub fn tags_in(&self, zone: &Zone) -> Vec<Vec<u8>> {
        let mut tags: Vec<Vec<u8>> =
            self.tags.iter().filter(|(_, s)| &s.zone == zone).map(|(e, _)| e.as_slice().to_vec()).collect();
        tags.sort();
        tags
    }

    /// A mark in the order of arrivals: tags that come into a zone after it is taken are
    /// [`Presence::tags_arrived_since`] it (a lane takes one when a basket starts).
    pub fn arrival_mark(&self) -> u64 {
        self.arrivals
    }

    /// Tags in `zone` that arrived there after `mark`.
    pub fn tags_arrived_since(&self, zone: &Zone, mark: u64) -> Vec<Vec<u8>> {
        let mut tags: Vec<Vec<u8>> = self
            .tags
            .iter()
            .filter(|(_, s)| &s.zone == zone && s.arrival > mark)
            .map(|(e, _)| e.as_slice().to_vec())
            .collect();
        tags.sort();
        tags
    }

    /// What a cycle count of `zone` finds now.
    pub fn count(&self, zone: &Zone) -> ZoneCount {
        let mut c = ZoneCount::default();
        for (epc, seen) in &self.tags {
            if &seen.zone != zone {
                continue;
            }
            match decode_sgtin96(epc.as_slice()) {
                Ok(s) => *c.by_gtin.entry(s.gtin).or_default() += 1,
                Err(_) => c.not_sgtin += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_that_arrived_after_a_mark_are_told_apart() {
        let mut p = Presence::new(PresenceConfig::default(), []);
        let lane = Zone { reader: "checkout-1".into(), antenna: 1 };
        let shelf = Zone { reader: "shelf-1".into(), antenna: 1 };
        let mut read = |epc: u8, zone: &Zone, at_ms| p.on_read(TagRead { epc: &[epc], zone, at_ms }, |_| false);
        read(1, &lane, 0); // left at the lane before the basket
        read(2, &shelf, 0);
        let mark = p.arrival_mark();
        let mut read = |epc: u8, zone: &Zone, at_ms| p.on_read(TagRead { epc: &[epc], zone, at_ms }, |_| false);
        read(1, &lane, 10_000); // read again: not a new arrival
        read(3, &lane, 10_000); // put down during the basket
        read(2, &lane, 10_000); // moved from the shelf during the basket
        assert_eq!(p.tags_arrived_since(&lane, mark), vec![vec![2], vec![3]]);
        assert_eq!(p.tags_in(&lane), vec![vec![1], vec![2], vec![3]]);
    }

    fn zone(reader: &str, antenna: u8) -> Zone {
        Zone { reader: reader.into(), antenna }
    }
    fn epc(serial: u64) -> Vec<u8> {
        // SGTIN-96 of GTIN 80614141123458 (TDS example) with the given serial.
        let base = u128::from_str_radix("3074257BF7194E4000000000", 16).unwrap() | u128::from(serial);
        base.to_be_bytes()[4..].to_vec()
    }
    fn read<'a>(e: &'a [u8], z: &'a Zone, at_ms: u64) -> TagRead<'a> {
        TagRead { epc: e, zone: z, at_ms }
    }

    #[test]
    fn duplicates_arrivals_moves_departures_and_counts() {
        let mut p = Presence::new(PresenceConfig { dedup_window_ms: 1_000, depart_after_ms: 10_000, max_tags: 10 }, []);
        let shelf = zone("reader-1", 1);
        let fitting = zone("reader-1", 2);
        assert_eq!(p.on_read(read(&epc(1), &shelf, 0), |_| false).sighting, Sighting::Arrived);
        assert_eq!(p.on_read(read(&epc(1), &shelf, 500), |_| false).sighting, Sighting::Duplicate);
        assert_eq!(p.stats.duplicates, 1);
        p.on_read(read(&epc(2), &shelf, 600), |_| false);
        p.on_read(read(&[0xE2, 0x00, 0x12], &shelf, 700), |_| false);
        let count = p.count(&shelf);
        assert_eq!(count.by_gtin.get(&Gtin::parse("80614141123458").unwrap()), Some(&2));
        assert_eq!(count.not_sgtin, 1, "a non-SGTIN tag is counted apart, not crashed on");
        let moved = p.on_read(read(&epc(2), &fitting, 5_000), |_| false);
        assert_eq!(moved, ReadOutcome { sighting: Sighting::Moved { from: shelf.clone() }, alarm: None });
        assert_eq!(p.on_read(read(&epc(2), &fitting, 7_000), |_| false).sighting, Sighting::Again);
        let departed = p.poll(12_000);
        assert_eq!(departed.len(), 2, "tag 1 and the non-SGTIN tag, last seen before 2 000 ms: {departed:?}");
        assert_eq!(p.count(&fitting).by_gtin.values().sum::<u64>(), 1);
    }

    #[test]
    fn the_exit_gate_alarms_for_unsold_tags_only() {
        let gate = zone("gate-1", 1);
        let mut p = Presence::new(PresenceConfig::default(), [gate.clone()]);
        let sold = epc(7);
        let outcome = p.on_read(read(&epc(8), &gate, 0), |e| e == sold.as_slice());
        assert!(
            matches!(&outcome.alarm, Some(PresenceEvent::ExitAlarm { serial: Some(8), gtin: Some(_), .. })),
            "{outcome:?}"
        );
        let outcome = p.on_read(read(&sold, &gate, 0), |e| e == sold.as_slice());
        assert_eq!(outcome, ReadOutcome { sighting: Sighting::Arrived, alarm: None }, "a sold item passes");
    }

    #[test]
    fn the_tag_table_is_bounded() {
        let mut p = Presence::new(PresenceConfig { max_tags: 2, ..PresenceConfig::default() }, []);
        for s in 0..5 {
            p.on_read(read(&epc(s), &zone("r", 1), 0), |_| false);
        }
        assert_eq!(p.stats.dropped, 3);
    }
}
