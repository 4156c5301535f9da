//! Zone cycle counts: the distinct tags a reader reads over a counting zone (some of its
//! antennas) during one inventory cycle become a stock count. A cycle is either the reader's
//! own (an `InventoryCycle` start, its reads, its end), or, for readers that send no such
//! message (Impinj JSON), a window of `cycle_seconds` of wall time aligned on the epoch. A
//! cycle is counted only if the hub saw it whole: from its start (a window the hub joined late,
//! such as the one running at start-up, is skipped), without reads lost by the reader (its
//! overflow counter grew) or past this module's bound. Each closed cycle is handed out once,
//! with an identity (reader, boot and cycle number, or the window's start) from which the
//! ledger's idempotency keys are made, so a repeated end or a restart never counts it twice.
//! Pure: reads, cycle messages and time come in, counts go out.

use std::collections::{BTreeMap, HashMap, HashSet};

use shared::{decode_sgtin96, Gtin};

/// Distinct tags held per open cycle of a zone; past it the cycle is not counted (reported).
pub const MAX_TAGS_PER_CYCLE: usize = 100_000;

/// A counting zone: antennas of one reader whose tags are counted together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountZone {
    pub reader: String,
    pub antennas: Vec<u8>,
    /// `Some`: cycles are windows of this many ms; `None`: the reader's own cycle messages.
    pub window_ms: Option<u64>,
    /// Products whose whole stock is in this zone: a whole cycle that saw none of their tags
    /// counts them as 0.
    pub holds: Vec<shared::Sku>,
}

impl CountZone {
    /// `reader:1+2`, for logs and keys.
    pub fn name(&self) -> String {
        let antennas: Vec<String> = self.antennas.iter().map(u8::to_string).collect();
        format!("{}:{}", self.reader, antennas.join("+"))
    }
}

/// Which cycle a count is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CycleId {
    /// The reader's own cycle `cycle` of its boot `boot`.
    Native { boot: u32, cycle: u32 },
    /// The window starting at this Unix ms.
    Window { start_ms: u64 },
}

impl std::fmt::Display for CycleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CycleId::Native { boot, cycle } => write!(f, "boot-{boot:08x}:cycle-{cycle}"),
            CycleId::Window { start_ms } => write!(f, "window-{start_ms}"),
        }
    }
}

/// A finished cycle of a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleCount {
    pub zone: CountZone,
    pub cycle: CycleId,
    /// Distinct SGTIN-96 tags per GTIN.
    pub by_gtin: BTreeMap<Gtin, u64>,
    /// Distinct tags that are not SGTIN-96.
    pub not_sgtin: u64,
}

impl CycleCount {
    /// The ledger idempotency key of this cycle's count of one SKU: the business identity of
    /// the observation (DESIGN 13.4).
    pub fn key(&self, sku: &str) -> String {
        format!("rfid-count:{}:{}:{sku}", self.zone.name(), self.cycle)
    }
}

/// Why an ended cycle is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A window the hub did not watch from its start (the one running at start-up, or after
    /// a stall or a clock step). Expected.
    JoinedLate,
    /// No tag was read: a reader that is off or idle, not an empty shelf (which a zone cannot
    /// tell from an antenna that saw nothing). Expected.
    NothingRead,
    /// The reader dropped reads during the cycle (its overflow counter grew).
    ReadsLost,
    /// More distinct tags than [`MAX_TAGS_PER_CYCLE`].
    TooManyTags,
    /// An end whose start the hub did not see (it started before the hub, or it is a repeat
    /// of an end already counted).
    StartNotSeen,
    /// A new cycle started before this one ended.
    Superseded,
}

impl SkipReason {
    /// Whether this happens in normal operation (logged at debug) rather than a problem.
    pub fn is_expected(self) -> bool {
        matches!(self, SkipReason::JoinedLate | SkipReason::NothingRead)
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::JoinedLate => "the hub did not watch the window from its start",
            SkipReason::NothingRead => "no tag was read",
            SkipReason::ReadsLost => "the reader dropped reads during the cycle",
            SkipReason::TooManyTags => "more distinct tags than a cycle may hold",
            SkipReason::StartNotSeen => "its start was not seen (or it was counted already)",
            SkipReason::Superseded => "a new cycle started before it ended",
        })
    }
}

/// A cycle that ended but is not counted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub zone: String,
    pub cycle: CycleId,
    pub reason: SkipReason,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Closed {
    pub counted: Vec<CycleCount>,
    pub skipped: Vec<Skipped>,
}

impl Closed {
    pub fn merge(&mut self, other: Closed) {
        self.counted.extend(other.counted);
        self.skipped.extend(other.skipped);
    }
}

#[derive(Debug)]
struct Open {
    cycle: CycleId,
    epcs: HashSet<Vec<u8>>,
    /// Why it will not be counted, if something spoiled it.
    spoiled: Option<SkipReason>,
}

#[derive(Debug)]
struct ZoneState {
    zone: CountZone,
    open: Option<Open>,
}

#[derive(Debug, Default)]
pub struct CycleCounter {
    zones: Vec<ZoneState>,
    /// Zones by reader.
    by_reader: HashMap<String, Vec<usize>>,
    /// Each reader's overflow counter, as last reported.
    overflow: HashMap<String, u32>,
}

impl CycleCounter {
    pub fn new(zones: Vec<CountZone>) -> CycleCounter {
        let mut by_reader: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, z) in zones.iter().enumerate() {
            by_reader.entry(z.reader.clone()).or_default().push(i);
        }
        CycleCounter {
            zones: zones.into_iter().map(|zone| ZoneState { zone, open: None }).collect(),
            by_reader,
            overflow: HashMap::new(),
        }
    }

    /// Whether any zone is configured (the router skips the work otherwise).
    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    /// A tag read on `reader`'s `antenna` at `wall_ms`. A windowed zone whose window has ended
    /// is closed first (its count is returned).
    pub fn on_read(&mut self, reader: &str, antenna: u8, epc: &[u8], wall_ms: u64) -> Closed {
        let mut closed = Closed::default();
        let Some(ids) = self.by_reader.get(reader) else { return closed };
        for &i in ids {
            let z = &mut self.zones[i];
            if !z.zone.antennas.contains(&antenna) {
                continue;
            }
            if let Some(window) = z.zone.window_ms {
                closed.merge(roll_window(z, window, wall_ms));
            }
            let Some(open) = &mut z.open else { continue };
            if open.epcs.contains(epc) {
                continue;
            }
            if open.epcs.len() >= MAX_TAGS_PER_CYCLE {
                open.spoiled = Some(SkipReason::TooManyTags);
                continue;
            }
            open.epcs.insert(epc.to_vec());
        }
        closed
    }

    /// The reader's own cycle started or ended (`antennas` empty: all).
    pub fn on_cycle(&mut self, reader: &str, boot: u32, cycle: u32, ended: bool, antennas: &[u8]) -> Closed {
        let mut closed = Closed::default();
        let Some(ids) = self.by_reader.get(reader) else { return closed };
        let id = CycleId::Native { boot, cycle };
        for &i in ids {
            let z = &mut self.zones[i];
            let covered = antennas.is_empty() || z.zone.antennas.iter().all(|a| antennas.contains(a));
            if z.zone.window_ms.is_some() || !covered {
                continue;
            }
            if !ended {
                if let Some(old) = z.open.replace(Open { cycle: id, epcs: HashSet::new(), spoiled: None }) {
                    closed.skipped.push(Skipped {
                        zone: z.zone.name(),
                        cycle: old.cycle,
                        reason: SkipReason::Superseded,
                    });
                }
                continue;
            }
            match z.open.take() {
                Some(open) if open.cycle == id => closed.merge(finish(&z.zone, open)),
                other => {
                    z.open = other;
                    closed.skipped.push(Skipped { zone: z.zone.name(), cycle: id, reason: SkipReason::StartNotSeen });
                }
            }
        }
        closed
    }

    /// A reader reported its overflow counter (reads dropped since boot): if it grew, the
    /// cycles open on its zones lost reads and will not be counted.
    pub fn on_overflow(&mut self, reader: &str, overflow: u32) {
        let before = self.overflow.insert(reader.to_owned(), overflow);
        if before.is_some_and(|b| overflow <= b) || overflow == 0 {
            return;
        }
        for &i in self.by_reader.get(reader).into_iter().flatten() {
            if let Some(open) = &mut self.zones[i].open {
                open.spoiled = Some(SkipReason::ReadsLost);
            }
        }
    }

    /// Windows that ended by `wall_ms` (called about once a second).
    pub fn poll(&mut self, wall_ms: u64) -> Closed {
        let mut closed = Closed::default();
        for z in &mut self.zones {
            if let Some(window) = z.zone.window_ms {
                closed.merge(roll_window(z, window, wall_ms));
            }
        }
        closed
    }
}

/// Moves a windowed zone to the window holding `wall_ms`, closing the one before. A window
/// the zone did not follow from its start (the first one, or after a gap or a clock step) is
/// spoiled.
fn roll_window(z: &mut ZoneState, window_ms: u64, wall_ms: u64) -> Closed {
    let window_ms = window_ms.max(1);
    let start_ms = wall_ms - wall_ms % window_ms;
    let current = CycleId::Window { start_ms };
    let mut closed = Closed::default();
    let follows = match &z.open {
        Some(open) if open.cycle == current => return closed,
        Some(open) => {
            let follows =
                matches!(open.cycle, CycleId::Window { start_ms: s } if s.checked_add(window_ms) == Some(start_ms));
            if let Some(open) = z.open.take() {
                closed.merge(finish(&z.zone, open));
            }
            follows
        }
        None => false,
    };
    let spoiled = (!follows).then_some(SkipReason::JoinedLate);
    z.open = Some(Open { cycle: current, epcs: HashSet::new(), spoiled });
    closed
}

fn finish(zone: &CountZone, open: Open) -> Closed {
    let mut closed = Closed::default();
    if let Some(reason) = open.spoiled {
        closed.skipped.push(Skipped { zone: zone.name(), cycle: open.cycle, reason });
        return closed;
    }
    if open.epcs.is_empty() {
        closed.skipped.push(Skipped { zone: zone.name(), cycle: open.cycle, reason: SkipReason::NothingRead });
        return closed;
    }
    let mut count = CycleCount { zone: zone.clone(), cycle: open.cycle, by_gtin: BTreeMap::new(), not_sgtin: 0 };
    for epc in &open.epcs {
        match decode_sgtin96(epc) {
            Ok(s) => *count.by_gtin.entry(s.gtin).or_default() += 1,
            Err(_) => count.not_sgtin += 1,
        }
    }
    closed.counted.push(count);
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epc(serial: u64) -> Vec<u8> {
        // SGTIN-96 of GTIN 80614141123458 (the TDS example) with the given serial.
        let base = u128::from_str_radix("3074257BF7194E4000000000", 16).unwrap() | u128::from(serial);
        base.to_be_bytes()[4..].to_vec()
    }
    fn gtin() -> Gtin {
        Gtin::parse("80614141123458").unwrap()
    }
    fn zone(window_ms: Option<u64>) -> CountZone {
        CountZone { reader: "shelf-1".into(), antennas: vec![1, 2], window_ms, holds: Vec::new() }
    }

    #[test]
    fn a_native_cycle_counts_distinct_tags_of_its_zone_once() {
        let mut c = CycleCounter::new(vec![zone(None)]);
        assert_eq!(c.on_cycle("shelf-1", 9, 1, false, &[]), Closed::default());
        for serial in [1, 2, 3, 2, 1] {
            c.on_read("shelf-1", 1, &epc(serial), 0);
        }
        c.on_read("shelf-1", 2, &[0xE2, 0x80], 0); // not SGTIN-96
        c.on_read("shelf-1", 3, &epc(99), 0); // another antenna: not this zone
        c.on_read("shelf-2", 1, &epc(98), 0); // another reader
        let closed = c.on_cycle("shelf-1", 9, 1, true, &[1, 2, 3]);
        assert_eq!(closed.counted.len(), 1, "{closed:?}");
        let count = &closed.counted[0];
        assert_eq!((count.by_gtin.get(&gtin()), count.not_sgtin), (Some(&3), 1));
        assert_eq!(count.key("MILK"), "rfid-count:shelf-1:1+2:boot-00000009:cycle-1:MILK");
        let again = c.on_cycle("shelf-1", 9, 1, true, &[]);
        assert!(again.counted.is_empty() && again.skipped.len() == 1, "a repeated end counts nothing: {again:?}");
    }

    #[test]
    fn a_cycle_is_not_counted_when_reads_were_lost_or_its_start_was_missed() {
        let mut c = CycleCounter::new(vec![zone(None)]);
        c.on_overflow("shelf-1", 3); // before the cycle: fine
        c.on_cycle("shelf-1", 9, 1, false, &[]);
        c.on_read("shelf-1", 1, &epc(1), 0);
        c.on_overflow("shelf-1", 3);
        c.on_overflow("shelf-1", 5);
        let closed = c.on_cycle("shelf-1", 9, 1, true, &[]);
        assert_eq!(closed.skipped[0].reason, SkipReason::ReadsLost);
        let closed = c.on_cycle("shelf-1", 9, 2, true, &[]);
        assert!(closed.counted.is_empty() && closed.skipped.len() == 1);
        // A cycle over other antennas does not close this zone's.
        c.on_cycle("shelf-1", 9, 3, false, &[]);
        c.on_read("shelf-1", 2, &epc(1), 0);
        assert_eq!(c.on_cycle("shelf-1", 9, 3, true, &[1]), Closed::default());
        assert_eq!(c.on_cycle("shelf-1", 9, 3, true, &[1, 2]).counted.len(), 1);
    }

    #[test]
    fn windows_count_only_when_watched_from_their_start() {
        let mut c = CycleCounter::new(vec![zone(Some(10_000))]);
        c.on_read("shelf-1", 1, &epc(1), 25_000); // joined window 20 000 late
        let closed = c.poll(30_000);
        assert_eq!(closed.skipped.iter().map(|s| s.reason).collect::<Vec<_>>(), [SkipReason::JoinedLate]);
        for serial in [1, 2, 2] {
            c.on_read("shelf-1", 2, &epc(serial), 31_000);
        }
        // The next read, in the following window, closes this one.
        let closed = c.on_read("shelf-1", 1, &epc(5), 40_001);
        assert_eq!(closed.counted.len(), 1, "{closed:?}");
        assert_eq!(closed.counted[0].cycle, CycleId::Window { start_ms: 30_000 });
        assert_eq!(closed.counted[0].by_gtin.get(&gtin()), Some(&2));
        // A gap (no poll for a whole window: the hub stalled, or the clock stepped) spoils
        // the window it lands in.
        let closed = c.poll(60_000);
        assert_eq!(closed.counted.len(), 1, "window 40 000 was watched whole");
        c.on_read("shelf-1", 1, &epc(5), 60_500);
        let closed = c.poll(70_000);
        assert_eq!(closed.skipped[0].reason, SkipReason::JoinedLate);
        c.on_read("shelf-1", 1, &epc(5), 70_500);
        assert_eq!(c.poll(80_000).counted.len(), 1, "window 70 000 followed on");
        let closed = c.poll(90_000);
        assert!(closed.counted.is_empty() && closed.skipped[0].reason == SkipReason::NothingRead);
    }

    #[test]
    fn a_cycle_holds_a_bounded_number_of_tags() {
        let mut c = CycleCounter::new(vec![zone(None)]);
        c.on_cycle("shelf-1", 1, 1, false, &[]);
        for serial in 0..=MAX_TAGS_PER_CYCLE as u64 {
            c.on_read("shelf-1", 1, &epc(serial), 0);
        }
        let closed = c.on_cycle("shelf-1", 1, 1, true, &[]);
        assert_eq!(closed.skipped[0].reason, SkipReason::TooManyTags);
    }
}
