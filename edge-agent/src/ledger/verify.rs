//! `ledger verify`: re-walks the whole event log and checks that it is the log the writer
//! wrote: sequence numbers contiguous from 1, each event's `prev_hash` equal to its
//! predecessor's hash, each hash recomputed from the stored columns, bodies decodable and of
//! the kind recorded, the head recorded in `meta` equal to the last event (so a deleted tail is
//! caught), the store's own stock slots equal to the replay of the events' movements, and its
//! own online allocation rows (grants, handovers) equal to the replay of the events that made
//! them.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;
use shared::{ActorId, EscrowRow, OrderId, Sku, Slot, StoreId};

use super::chain::{event_hash, hex, Hash, GENESIS};
use super::command::EventBody;
use super::{projection, LedgerError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub skus_checked: u64,
    /// Own online allocation rows (grants, handovers) checked against the events.
    pub allocation_rows_checked: u64,
}

/// The first thing found wrong. `seq` is the first event that does not check out, when the
/// problem is in the log; `None` when it is in a projection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}{detail}", seq.map(|s| format!("event {s}: ")).unwrap_or_default())]
pub struct ChainBreak {
    pub seq: Option<u64>,
    pub detail: String,
}

fn broken(seq: u64, detail: impl Into<String>) -> ChainBreak {
    ChainBreak { seq: Some(seq), detail: detail.into() }
}

/// The actors the ledger wrote as, each with the first sequence number it may stamp
/// (`own_actors`; the current actor of `meta` from the start if a ledger bound before that
/// table was kept whole lacks it).
fn own_actors(conn: &Connection) -> Result<BTreeMap<ActorId, u64>, LedgerError> {
    let mut stmt = conn.prepare("SELECT actor, since_seq FROM own_actors")?;
    let rows: Vec<(String, i64)> = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    let mut own = BTreeMap::new();
    for (name, since) in rows {
        let corrupt = |detail: String| LedgerError::Corrupt { seq: None, detail: format!("own_actors: {detail}") };
        let actor = ActorId::new(name).map_err(|e| corrupt(e.to_string()))?;
        let since = u64::try_from(since).map_err(|_| corrupt(format!("{actor} starts at {since}")))?;
        own.insert(actor, since);
    }
    own.entry(super::meta_actor(conn)?).or_insert(1);
    Ok(own)
}

pub fn verify(conn: &Connection) -> Result<Result<VerifyReport, ChainBreak>, LedgerError> {
    let store: String = conn.query_row("SELECT value FROM meta WHERE key = 'store'", [], |r| r.get(0))?;
    let store = StoreId::new(store).map_err(|e| LedgerError::Corrupt { seq: None, detail: e.to_string() })?;
    // Every actor this ledger wrote as (a restored backup has two or more): all its events are
    // stamped by one of them, and each one's slots must equal the replay of its movements and
    // of the cloud's rows for it merged by max.
    let own = own_actors(conn)?;

    let mut stmt = conn.prepare(
        "SELECT seq, hlc_wall, hlc_logical, actor, kind, idem_key, body, prev_hash, hash FROM events ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut expected_seq = 1u64;
    let mut prev: Hash = GENESIS;
    let mut replayed: BTreeMap<(ActorId, Sku), Slot> = BTreeMap::new();
    // Own allocation rows: the store's `granted` per SKU (a maximum) and its handovers.
    let mut granted: BTreeMap<Sku, u64> = BTreeMap::new();
    let mut fulfilled: BTreeSet<(Sku, OrderId)> = BTreeSet::new();
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        if seq != expected_seq as i64 {
            return Ok(Err(broken(
                expected_seq,
                format!("missing or moved: expected sequence number {expected_seq}, found {seq}"),
            )));
        }
        let Ok(stamp) = projection::stamp_from(row, 1) else {
            return Ok(Err(broken(expected_seq, "unreadable HLC stamp")));
        };
        let kind: String = row.get(4)?;
        let key: String = row.get(5)?;
        let body: Vec<u8> = row.get(6)?;
        let prev_hash: Vec<u8> = row.get(7)?;
        let hash: Vec<u8> = row.get(8)?;
        if prev_hash != prev {
            return Ok(Err(broken(
                expected_seq,
                format!("prev_hash {} does not match the hash of event {}", hex(&prev_hash), expected_seq - 1),
            )));
        }
        let recomputed = event_hash(&prev, expected_seq, &stamp, &kind, &key, &body);
        if hash != recomputed {
            return Ok(Err(broken(expected_seq, "content does not match its hash (the row was changed)")));
        }
        let decoded = match EventBody::decode(&body) {
            Ok(b) => b,
            Err(e) => return Ok(Err(broken(expected_seq, e))),
        };
        if decoded.kind() != kind {
            return Ok(Err(broken(
                expected_seq,
                format!("kind {kind:?} does not match its body ({})", decoded.kind()),
            )));
        }
        // The writer stamps every event as the actor it writes as: another actor here (or one
        // before it started) means the log or `own_actors` was edited.
        match own.get(&stamp.actor) {
            Some(since) if *since <= expected_seq => {}
            _ => {
                return Ok(Err(broken(
                    expected_seq,
                    format!("stamped by actor {}, which this ledger did not write as then", stamp.actor),
                )))
            }
        }
        for actor in own.keys() {
            for (sku, merged) in decoded.own_slot_merges(&store, actor) {
                let slot = replayed.entry((actor.clone(), sku.clone())).or_default();
                *slot = slot.merge(merged);
            }
        }
        for (sku, movement) in decoded.stock_movements() {
            let slot = replayed.entry((stamp.actor.clone(), sku.clone())).or_default();
            match slot.apply(movement) {
                Some(next) => *slot = next,
                None => return Ok(Err(broken(expected_seq, format!("stock of {sku} overflows on replay")))),
            }
        }
        for row in decoded.own_escrow_rows(&store) {
            match row {
                EscrowRow::Granted { key, granted: g } => {
                    let total = granted.entry(key.sku).or_default();
                    *total = (*total).max(g);
                }
                EscrowRow::Fulfilled { key, order } => {
                    fulfilled.insert((key.sku, order));
                }
                EscrowRow::Released { .. } | EscrowRow::Reservation { .. } => {}
            }
        }
        prev = recomputed;
        expected_seq += 1;
    }
    let events = expected_seq - 1;

    let head_seq: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'head_seq'", [], |r| r.get(0)).optional()?;
    let head_hash: Option<Vec<u8>> =
        conn.query_row("SELECT value FROM meta WHERE key = 'head_hash'", [], |r| r.get(0)).optional()?;
    let recorded = head_seq.unwrap_or(0) as u64;
    if recorded != events {
        return Ok(Err(broken(
            events + 1,
            format!("the log ends at event {events} but the ledger recorded {recorded} events (events were removed from the end)"),
        )));
    }
    if events > 0 && head_hash.as_deref() != Some(&prev[..]) {
        return Ok(Err(broken(events, "the last event's hash does not match the head the ledger recorded")));
    }

    let mut stmt = conn.prepare("SELECT actor, sku FROM stock_slots WHERE store = ?1")?;
    let stored_keys: Vec<(String, String)> =
        stmt.query_map([store.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
    for (actor, sku) in stored_keys {
        let corrupt = |e: shared::IdError| LedgerError::Corrupt { seq: None, detail: e.to_string() };
        let actor = ActorId::new(actor).map_err(corrupt)?;
        if own.contains_key(&actor) {
            replayed.entry((actor, Sku::new(sku).map_err(corrupt)?)).or_default();
        }
    }
    for ((actor, sku), expected) in &replayed {
        let key = shared::SlotKey { store: store.clone(), sku: sku.clone(), actor: actor.clone() };
        let stored = projection::slot(conn, &key)?;
        if stored != *expected {
            // Name the actor only where the ledger wrote as more than one.
            let whose = if own.len() > 1 { format!(" (actor {actor})") } else { String::new() };
            return Ok(Err(ChainBreak {
                seq: None,
                detail: format!(
                    "stock projection of {sku}{whose} is (in {}, out {}) but the events add up to (in {}, out {})",
                    stored.inc, stored.dec, expected.inc, expected.dec
                ),
            }));
        }
    }
    let stored = own_allocation(conn, &store)?;
    let expected_granted: Vec<(Sku, u64)> = granted.into_iter().filter(|(_, g)| *g > 0).collect();
    let stored_granted: Vec<(Sku, u64)> = stored.0.into_iter().filter(|(_, g)| *g > 0).collect();
    if stored_granted != expected_granted {
        let first = first_difference(&stored_granted, &expected_granted);
        return Ok(Err(ChainBreak {
            seq: None,
            detail: format!("online allocation granted of {first} does not match the grant events"),
        }));
    }
    if let Some((sku, order)) = stored.1.symmetric_difference(&fulfilled).next() {
        let (here, there) = if stored.1.contains(&(sku.clone(), order.clone())) {
            ("handed over", "not handed over")
        } else {
            ("not handed over", "handed over")
        };
        return Ok(Err(ChainBreak {
            seq: None,
            detail: format!("online order {order} ({sku}) is {here} in the allocation but {there} by the events"),
        }));
    }
    let allocation_rows_checked = (expected_granted.len() + fulfilled.len()) as u64;
    Ok(Ok(VerifyReport {
        events,
        head_seq: events,
        head_hash: hex(&prev),
        skus_checked: replayed.keys().map(|(_, sku)| sku).collect::<BTreeSet<_>>().len() as u64,
        allocation_rows_checked,
    }))
}

/// The store's own allocation rows as stored: `granted` per SKU, and the handed-over lines.
#[allow(clippy::type_complexity)]
fn own_allocation(
    conn: &Connection,
    store: &StoreId,
) -> Result<(Vec<(Sku, u64)>, BTreeSet<(Sku, OrderId)>), LedgerError> {
    let mut granted = Vec::new();
    let mut fulfilled = BTreeSet::new();
    for sku in super::allocation::skus(conn)? {
        for row in super::allocation::rows_of(conn, store, &sku)? {
            match row {
                EscrowRow::Granted { key, granted: g } => granted.push((key.sku, g)),
                EscrowRow::Fulfilled { key, order } => {
                    fulfilled.insert((key.sku, order));
                }
                EscrowRow::Released { .. } | EscrowRow::Reservation { .. } => {}
            }
        }
    }
    Ok((granted, fulfilled))
}

/// The SKU of the first entry where two sorted lists differ.
fn first_difference(a: &[(Sku, u64)], b: &[(Sku, u64)]) -> String {
    a.iter()
        .zip(b.iter())
        .find(|(x, y)| x != y)
        .map(|(x, y)| std::cmp::min(&x.0, &y.0).to_string())
        .or_else(|| a.get(b.len()).or_else(|| b.get(a.len())).map(|x| x.0.to_string()))
        .unwrap_or_default()
}
