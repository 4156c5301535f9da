//! Tag presence per zone (a reader's antenna): repeated reads of a tag in its zone within the
//! dedup window are one sighting; a tag seen in a new zone has arrived (or moved); a tag not
//! seen for `depart_after_ms` has departed. A snapshot of a zone groups its present SGTIN tags
//! by GTIN; other EPCs are counted apart (the counts that become stock counts are inventory
//! cycles: [`super::cycle`]). An exit-gate zone raises an alarm for a tag whose EPC was not
//! recorded as sold. A read is taken by reference and costs no allocation unless the tag is new
//! (this is the hot path of RFID ingest).

use std::collections::hash_map::Entry;
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

/// Most tags the 96-bit table is sized for up front (the default `max_tags`).
const PRESIZED_TAGS: usize = 200_000;

/// A zone's place in [`Presence`]'s zone list: what a tag's entry holds instead of the zone.
type ZoneIx = u32;

/// Where and when a tag was last seen. Small on purpose: a store tracks up to `max_tags` of
/// these, and a read of a new tag writes one into a table of that size (the hot path).
#[derive(Debug, Clone, Copy)]
struct Seen {
    zone: ZoneIx,
    last_ms: u64,
    /// When the tag arrived in `zone`, in the order of arrivals (see [`Presence::arrival_mark`]).
    arrival: u64,
}

/// What a read did to its tag's entry.
enum Step {
    Duplicate,
    Again,
    /// From the zone of this index.
    Moved(ZoneIx),
    Arrived,
    Dropped,
}

/// A read of a tracked tag: in its zone (within the dedup window or not), or moved to `new`'s.
fn step_tracked(seen: &mut Seen, new: Seen, dedup_window_ms: u64) -> Step {
    if seen.zone != new.zone {
        let from = seen.zone;
        *seen = new;
        return Step::Moved(from);
    }
    let duplicate = new.last_ms.saturating_sub(seen.last_ms) < dedup_window_ms;
    seen.last_ms = seen.last_ms.max(new.last_ms);
    if duplicate {
        Step::Duplicate
    } else {
        Step::Again
    }
}

/// Totals for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub reads: u64,
    pub duplicates: u64,
    pub dropped: u64,
}

/// Most zones (reader antennas) tracked: zones are listed for good, and readers are devices
/// that could name any antenna; reads in further zones are dropped and counted (`dropped`).
pub const MAX_ZONES: usize = 4_096;

/// Hashes EPCs for the tag table: keyed per process (see [`Presence`]).
type EpcHasher = foldhash::fast::RandomState;

/// The tag table. 96-bit EPCs (SGTIN-96, nearly every retail tag) are keyed by their 12 bytes
/// inline, other lengths on the heap: an entry of a 96-bit tag is 40 bytes with no pointer to
/// chase, and a new tag costs no allocation. Zones are listed once and entries name them by
/// index. EPCs are written by whoever holds a tag, so the table is hashed with a key chosen at
/// random per process (foldhash: a fraction of SipHash's cost on 12 bytes, the hot path of RFID
/// ingest), not a fixed function whose collisions could be chosen.
#[derive(Debug, Default)]
pub struct Presence {
    config: PresenceConfig,
    tags: HashMap<[u8; 12], Seen, EpcHasher>,
    other_tags: HashMap<Box<[u8]>, Seen, EpcHasher>,
    /// Every zone seen, each once; bounded by the readers the router accepts times their
    /// antennas.
    zones: Vec<Zone>,
    /// Whether the zone of the same index is an exit zone.
    exit: Vec<bool>,
    zone_ix: HashMap<Zone, ZoneIx>,
    /// The zone of the last read: reads come in batches of one reader's antenna.
    last_zone: Option<(Zone, ZoneIx)>,
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
        let mut presence = Presence { config, exit_zones: exit_zones.into_iter().collect(), ..Presence::default() };
        // Sized for the tags it may track (up to the default bound) once: growing would move
        // every tracked tag at each doubling while reads wait. The memory is only touched as
        // tags arrive (~40 bytes each).
        presence.tags.reserve(presence.config.max_tags.min(PRESIZED_TAGS));
        presence
    }

    /// The index of `zone`, listing it on first sight; `None` when [`MAX_ZONES`] are listed.
    #[inline]
    fn zone_ix(&mut self, zone: &Zone) -> Option<ZoneIx> {
        // Every read asks, and nearly always for the zone of the read before.
        if let Some((last, ix)) = &self.last_zone {
            if last.antenna == zone.antenna && (Arc::ptr_eq(&last.reader, &zone.reader) || last.reader == zone.reader) {
                return Some(*ix);
            }
        }
        self.list_zone(zone)
    }

    /// [`Presence::zone_ix`] for a zone other than the last one.
    #[inline(never)]
    fn list_zone(&mut self, zone: &Zone) -> Option<ZoneIx> {
        let ix = match self.zone_ix.get(zone) {
            Some(ix) => *ix,
            None if self.zones.len() >= MAX_ZONES => return None,
            None => {
                let ix = self.zones.len() as ZoneIx;
                self.zones.push(zone.clone());
                self.exit.push(self.exit_zones.contains(zone));
                self.zone_ix.insert(zone.clone(), ix);
                ix
            }
        };
        self.last_zone = Some((zone.clone(), ix));
        Some(ix)
    }

    /// The index of `zone` if any tag was ever seen there.
    fn known_zone(&self, zone: &Zone) -> Option<ZoneIx> {
        self.zone_ix.get(zone).copied()
    }

    /// Every tracked tag with where it was seen.
    fn entries(&self) -> impl Iterator<Item = (&[u8], &Seen)> {
        self.tags.iter().map(|(e, s)| (&e[..], s)).chain(self.other_tags.iter().map(|(e, s)| (&e[..], s)))
    }

    /// One read; `sold` says whether an EPC was recorded as sold (for the exit gate, asked only
    /// when the tag came into an exit zone).
    // Inlined into the router's loop over a message's reads: the outcome stays in registers.
    #[inline]
    pub fn on_read(&mut self, read: TagRead<'_>, sold: impl Fn(&[u8]) -> bool) -> ReadOutcome {
        self.stats.reads += 1;
        let Some(zone) = self.zone_ix(read.zone) else {
            self.stats.dropped += 1;
            return ReadOutcome { sighting: Sighting::Dropped, alarm: None };
        };
        let (dedup_window_ms, max_tags) = (self.config.dedup_window_ms, self.config.max_tags);
        let arrival = self.arrivals + 1;
        let new = Seen { zone, last_ms: read.at_ms, arrival };
        let room = self.tags.len() + self.other_tags.len() < max_tags;
        // One probe of the table per read, found or not.
        let step = match <[u8; 12]>::try_from(read.epc) {
            Ok(key) => match self.tags.entry(key) {
                Entry::Occupied(mut tracked) => step_tracked(tracked.get_mut(), new, dedup_window_ms),
                Entry::Vacant(free) if room => {
                    free.insert(new);
                    Step::Arrived
                }
                Entry::Vacant(_) => Step::Dropped,
            },
            Err(_) => match self.other_tags.get_mut(read.epc) {
                Some(tracked) => step_tracked(tracked, new, dedup_window_ms),
                None if room => {
                    self.other_tags.insert(read.epc.into(), new);
                    Step::Arrived
                }
                None => Step::Dropped,
            },
        };
        let sighting = match step {
            Step::Duplicate => {
                self.stats.duplicates += 1;
                return ReadOutcome { sighting: Sighting::Duplicate, alarm: None };
            }
            Step::Again => return ReadOutcome { sighting: Sighting::Again, alarm: None },
            Step::Dropped => {
                self.stats.dropped += 1;
                return ReadOutcome { sighting: Sighting::Dropped, alarm: None };
            }
            Step::Moved(from) => Sighting::Moved { from: self.zones[from as usize].clone() },
            Step::Arrived => Sighting::Arrived,
        };
        self.arrivals = arrival;
        let alarm = (self.exit[zone as usize] && !sold(read.epc)).then(|| {
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

    /// Looks a batch's tags up before its reads are applied one by one: the lookups do not
    /// depend on each other, so the CPU fetches their table entries together instead of
    /// waiting for each in turn (a table of many tags is larger than the CPU's cache).
    pub fn prefetch<'e>(&self, epcs: impl Iterator<Item = &'e [u8]>) {
        for epc in epcs {
            if let Ok(key) = <[u8; 12]>::try_from(epc) {
                std::hint::black_box(self.tags.get(&key));
            }
        }
    }

    /// Tags not seen for `depart_after_ms` have departed.
    pub fn poll(&mut self, now_ms: u64) -> Vec<PresenceEvent> {
        let depart_after_ms = self.config.depart_after_ms;
        let mut gone = Vec::new();
        let zones = &self.zones;
        let mut keep = |epc: &[u8], s: &Seen| {
            let stays = now_ms.saturating_sub(s.last_ms) < depart_after_ms;
            if !stays {
                gone.push((epc.to_vec(), zones[s.zone as usize].clone()));
            }
            stays
        };
        self.tags.retain(|epc, s| keep(epc, s));
        self.other_tags.retain(|epc, s| keep(epc, s));
        gone.sort();
        gone.into_iter().map(|(epc, zone)| PresenceEvent::Departed { epc, zone }).collect()
    }

    /// The tags present in `zone` now.
    pub fn tags_in(&self, zone: &Zone) -> Vec<Vec<u8>> {
        let Some(ix) = self.known_zone(zone) else { return Vec::new() };
        let mut tags: Vec<Vec<u8>> = self.entries().filter(|(_, s)| s.zone == ix).map(|(e, _)| e.to_vec()).collect();
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
        let Some(ix) = self.known_zone(zone) else { return Vec::new() };
        let mut tags: Vec<Vec<u8>> =
            self.entries().filter(|(_, s)| s.zone == ix && s.arrival > mark).map(|(e, _)| e.to_vec()).collect();
        tags.sort();
        tags
    }

    /// What a cycle count of `zone` finds now.
    pub fn count(&self, zone: &Zone) -> ZoneCount {
        let mut c = ZoneCount::default();
        let Some(ix) = self.known_zone(zone) else { return c };
        for (epc, _) in self.entries().filter(|(_, s)| s.zone == ix) {
            match decode_sgtin96(epc) {
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
    fn the_zone_list_is_bounded() {
        let mut p = Presence::new(PresenceConfig::default(), []);
        for r in 0..MAX_ZONES / 256 {
            for a in 0..=255u8 {
                let outcome = p.on_read(read(&epc(1), &zone(&format!("r{r}"), a), 0), |_| false);
                assert_ne!(outcome.sighting, Sighting::Dropped, "zone {r}:{a} is within the bound");
            }
        }
        assert_eq!(p.on_read(read(&epc(2), &zone("one-too-many", 1), 0), |_| false).sighting, Sighting::Dropped);
        assert_eq!(p.stats.dropped, 1);
        assert_eq!(
            p.on_read(read(&epc(3), &zone("r0", 7), 0), |_| false).sighting,
            Sighting::Arrived,
            "known zones go on"
        );
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
