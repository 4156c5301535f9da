//! The count task: turns each zone cycle count the MQTT router closes into stock counts in the
//! ledger. Tags are grouped by GTIN, GTINs mapped to products through the catalog's GTIN
//! index, and each product's number of distinct tags recorded with the ledger's `Count` command
//! (an observation: it stores what the ledger held and the movement, DESIGN 13.2) under a key
//! made of the zone, the reader's cycle and the product, so a cycle is counted once whatever
//! is repeated or restarted. A product the zone holds (`skus` of its configuration) whose tags
//! the cycle did not see at all is counted as 0: its stock is gone from the shelf, and a count
//! of only the products seen would leave the ledger believing in it. Tags of GTINs no product
//! has (or that several claim), and tags that are not SGTIN-96, are counted and reported, never
//! recorded. Every cycle's outcome is
//! one journal line and a JSON report on `se/v1/{store}/hub/count`. It runs apart from the
//! router so that waiting for the ledger never slows tag ingest.

use std::collections::BTreeMap;

use rumqttc::{AsyncClient, QoS};
use serde_json::json;
use shared::{Sku, StoreId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cycle::CycleCount;
use crate::ledger::{Command, EventBody, IdempotencyKey, LedgerHandle, LedgerReader};

/// Closed cycles waiting for the count task; the router drops (and counts) past this: the
/// zone's next cycle counts again.
pub const COUNT_QUEUE: usize = 64;

/// Where the hub publishes each cycle's report, as JSON.
pub fn report_topic(store: &StoreId) -> String {
    format!("se/v1/{store}/hub/count")
}

/// One product's count, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub counted: i64,
    pub seen: i64,
    pub movement: i64,
    /// The cycle had been recorded before (a repeated end, or a restart): nothing changed.
    pub replayed: bool,
}

/// What became of one cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub recorded: BTreeMap<Sku, Recorded>,
    /// Products whose count the ledger refused or could not write, with the reason.
    pub failed: BTreeMap<Sku, String>,
    /// Tags of GTINs no product has, per GTIN.
    pub unknown: BTreeMap<String, u64>,
    /// Tags of GTINs several products claim, per GTIN.
    pub ambiguous: BTreeMap<String, u64>,
    pub not_sgtin: u64,
}

pub struct CountTask {
    pub store: StoreId,
    pub reader: LedgerReader,
    pub ledger: LedgerHandle,
    /// Where reports are published (none: journal only).
    pub client: Option<AsyncClient>,
}

impl CountTask {
    /// Records one cycle's counts.
    pub async fn record(&mut self, count: &CycleCount) -> Result<Outcome, String> {
        let mut outcome = Outcome { not_sgtin: count.not_sgtin, ..Outcome::default() };
        let mut per_sku: BTreeMap<Sku, u64> = BTreeMap::new();
        // Products named by a GTIN several products claim, of which tags were read.
        let mut claimed: BTreeMap<Sku, String> = BTreeMap::new();
        for (gtin, n) in &count.by_gtin {
            let skus = self.reader.skus_by_gtin(gtin).map_err(|e| format!("looking up GTIN {gtin}: {e}"))?;
            match skus.as_slice() {
                [] => *outcome.unknown.entry(gtin.to_string()).or_default() += n,
                [sku] => *per_sku.entry(sku.clone()).or_default() += n,
                several => {
                    *outcome.ambiguous.entry(gtin.to_string()).or_default() += n;
                    claimed.extend(several.iter().map(|sku| (sku.clone(), gtin.to_string())));
                }
            }
        }
        // A held product none of whose tags were read counts 0, but only if its tags would
        // have been told apart: it has a GTIN of its own in the catalog and no tags of a GTIN
        // it shares were read. Otherwise its count is refused, not guessed.
        for sku in &count.zone.holds {
            if per_sku.contains_key(sku) {
                continue;
            }
            if let Some(gtin) = claimed.get(sku) {
                let why = format!("tags of GTIN {gtin}, which several products claim, were read: not counted as 0");
                outcome.failed.insert(sku.clone(), why);
                continue;
            }
            let item = self.reader.catalog_item(sku).map_err(|e| format!("looking up product {sku}: {e}"))?;
            if item.and_then(|i| i.gtins).is_none_or(|g| g.value.is_empty()) {
                let why = "it has no GTIN in the catalog, so its tags cannot be told apart: not counted as 0";
                outcome.failed.insert(sku.clone(), why.to_owned());
                continue;
            }
            per_sku.insert(sku.clone(), 0);
        }
        for (sku, n) in per_sku {
            let counted = i64::try_from(n).unwrap_or(i64::MAX);
            let key = match IdempotencyKey::new(count.key(sku.as_str())) {
                Ok(k) => k,
                Err(e) => {
                    outcome.failed.insert(sku, e.to_string());
                    continue;
                }
            };
            match self.ledger.submit(key, Command::Count { sku: sku.clone(), counted }).await {
                Ok(applied) => {
                    let (seen, movement) = match applied.body {
                        EventBody::Count { seen, movement, .. } => (seen, movement),
                        _ => (0, 0),
                    };
                    outcome.recorded.insert(sku, Recorded { counted, seen, movement, replayed: applied.replayed });
                }
                Err(e) => {
                    outcome.failed.insert(sku, e.to_string());
                }
            }
        }
        Ok(outcome)
    }

    fn report(&self, count: &CycleCount, outcome: &Outcome) {
        let recorded: Vec<String> = outcome
            .recorded
            .iter()
            .map(|(sku, r)| {
                format!(
                    "{sku}={} (ledger had {}{})",
                    r.counted,
                    r.seen,
                    if r.replayed { ", recorded before" } else { "" }
                )
            })
            .collect();
        tracing::info!(device_id = %count.zone.reader, zone = %count.zone.name(), cycle = %count.cycle,
            counted = ?recorded, "RFID zone count recorded");
        if !outcome.unknown.is_empty() || !outcome.ambiguous.is_empty() || outcome.not_sgtin > 0 {
            tracing::warn!(device_id = %count.zone.reader, zone = %count.zone.name(), cycle = %count.cycle,
                unknown_gtins = ?outcome.unknown, ambiguous_gtins = ?outcome.ambiguous, not_sgtin = outcome.not_sgtin,
                error_code = "RFID_COUNT_UNKNOWN", "RFID zone count: tags of unknown products were counted, not recorded");
        }
        for (sku, e) in &outcome.failed {
            tracing::error!(device_id = %count.zone.reader, zone = %count.zone.name(), cycle = %count.cycle, sku = %sku,
                error = %e, error_code = "RFID_COUNT_FAILED", "RFID zone count of a product not recorded; the zone's next cycle counts it again");
        }
    }

    fn report_json(count: &CycleCount, outcome: &Outcome) -> Vec<u8> {
        let recorded: serde_json::Map<String, serde_json::Value> = outcome
            .recorded
            .iter()
            .map(|(sku, r)| {
                let v = json!({ "counted": r.counted, "seen": r.seen, "movement": r.movement, "replayed": r.replayed });
                (sku.to_string(), v)
            })
            .collect();
        let failed: BTreeMap<String, &String> = outcome.failed.iter().map(|(s, e)| (s.to_string(), e)).collect();
        json!({
            "zone": count.zone.name(),
            "reader": count.zone.reader,
            "cycle": count.cycle.to_string(),
            "recorded": recorded,
            "failed": failed,
            "unknown_gtins": outcome.unknown,
            "ambiguous_gtins": outcome.ambiguous,
            "not_sgtin": outcome.not_sgtin,
        })
        .to_string()
        .into_bytes()
    }

    /// Records cycles as the router closes them, until `stop` (a cycle being recorded then is
    /// finished first) or the router is gone.
    pub async fn run(mut self, mut cycles: mpsc::Receiver<CycleCount>, stop: CancellationToken) {
        loop {
            let count = tokio::select! {
                _ = stop.cancelled() => return,
                c = cycles.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
            };
            let outcome = match self.record(&count).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(device_id = %count.zone.reader, zone = %count.zone.name(), cycle = %count.cycle, error = %e,
                        error_code = "RFID_COUNT_FAILED", "RFID zone count not recorded; the zone's next cycle counts again");
                    continue;
                }
            };
            self.report(&count, &outcome);
            if let Some(client) = &self.client {
                let payload = Self::report_json(&count, &outcome);
                if let Err(e) = client.publish(report_topic(&self.store), QoS::AtLeastOnce, false, payload).await {
                    tracing::warn!(error = %e, error_code = "MQTT_PUBLISH", "Cannot queue the RFID count report");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, LedgerOptions};
    use crate::rfid::cycle::{CountZone, CycleId};
    use shared::{CatalogField, Currency, Gtin};

    fn sku(s: &str) -> Sku {
        Sku::new(s).unwrap()
    }

    /// Held products are counted 0 only when their tags would have been told apart.
    #[tokio::test]
    async fn a_held_product_unseen_counts_zero_unless_its_tags_could_not_be_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreId::new("s1").unwrap();
        let opts = LedgerOptions::new(store.clone(), Currency::new("EUR").unwrap());
        let (ledger, writer) = Ledger::open(dir.path(), &opts).unwrap().start_writer(64).unwrap();
        let shared_gtin = Gtin::parse("4006381333931").unwrap();
        let catalog = [
            ("MILK", Some(Gtin::parse("96385074").unwrap())),
            ("TEA", Some(shared_gtin)),
            ("COFFEE", Some(shared_gtin)),
            ("LOOSE", None),
        ];
        for (i, (name, gtin)) in catalog.iter().enumerate() {
            let field = match gtin {
                Some(g) => CatalogField::Gtins(vec![*g]),
                None => CatalogField::Name("sold loose, untagged".into()),
            };
            let key = IdempotencyKey::new(format!("catalog-{i}")).unwrap();
            ledger.submit(key, Command::CatalogChange { sku: sku(name), field }).await.unwrap();
            let key = IdempotencyKey::new(format!("stock-{i}")).unwrap();
            ledger.submit(key, Command::Count { sku: sku(name), counted: 5 }).await.unwrap();
        }
        let mut task =
            CountTask { store, reader: LedgerReader::open(dir.path()).unwrap(), ledger: ledger.clone(), client: None };
        let zone = CountZone {
            reader: "shelf-1".into(),
            antennas: vec![1],
            window_ms: None,
            holds: ["MILK", "TEA", "LOOSE"].map(sku).to_vec(),
        };
        // Two tags of the GTIN tea and coffee share; none of milk's.
        let count = CycleCount {
            zone,
            cycle: CycleId::Native { boot: 1, cycle: 1 },
            by_gtin: [(shared_gtin, 2)].into_iter().collect(),
            not_sgtin: 0,
        };
        let outcome = task.record(&count).await.unwrap();
        assert_eq!(outcome.recorded.keys().collect::<Vec<_>>(), [&sku("MILK")], "{outcome:?}");
        assert_eq!((outcome.recorded[&sku("MILK")].counted, outcome.recorded[&sku("MILK")].movement), (0, -5));
        assert!(outcome.failed[&sku("TEA")].contains("several products claim"), "{outcome:?}");
        assert!(outcome.failed[&sku("LOOSE")].contains("no GTIN"), "{outcome:?}");
        assert_eq!(outcome.ambiguous.get("04006381333931").copied(), Some(2), "{outcome:?}");
        let reader = LedgerReader::open(dir.path()).unwrap();
        let on_hand = |s: &str| reader.stock(&sku(s)).unwrap().on_hand;
        assert_eq!((on_hand("MILK"), on_hand("TEA"), on_hand("LOOSE")), (0, 5, 5));
        drop((task, ledger));
        writer.join();
    }
}
