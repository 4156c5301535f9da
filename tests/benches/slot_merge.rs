//! Stock slot merges applied into SQLite, on the edge (a page of cloud rows through the ledger
//! writer, as sync applies it) and on the cloud (a store's push into each storage backend),
//! beside the `automerge` crate merging the same counter workload in the same run: N counters,
//! each moved by one actor, merged into a replica that has the previous round.
//! Target (DESIGN section 10): >= 100k slots/s and >= 5x automerge.
//!
//! A second reference, "bare SQLite", is the ceiling for any store that keeps slots as SQLite
//! rows (DESIGN 5): the same rows written into a table of the edge's slot shape with the
//! cheapest statement for the round (a plain insert in round 1, a keyed max-update after), one
//! durable transaction per page, and nothing else (no event log, no parsing, no checks).
//!
//! `cargo bench -p e2e-tests --bench slot_merge` (`SLOT_MERGE_N` sets N, default 50,000).

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ScalarValue, ROOT};
use cloud_sync::storage::sqlite::SqliteStorage;
use cloud_sync::storage::{Storage, SyncReport};
use edge_agent::ledger::{Ledger, LedgerOptions, MergedPage, SyncAck};
use shared::sync::{Cursor, Push, Rows, SlotGroup, SlotValue, MAX_PAGE_ROWS};
use shared::{ActorId, Currency, HlcStamp, StoreId};

const ROUNDS: u64 = 3;

fn skus(n: usize) -> Vec<shared::Sku> {
    (0..n).map(|i| shared::Sku::new(format!("SKU-{i:07}")).unwrap()).collect()
}

/// Round `r` of the workload: every slot moved again (inc grows by r, dec by r - 1).
fn group(store: &StoreId, actor: ActorId, skus: &[shared::Sku], round: u64) -> Vec<SlotGroup> {
    skus.chunks(MAX_PAGE_ROWS as usize)
        .map(|chunk| SlotGroup {
            store: store.clone(),
            actor: actor.clone(),
            slots: chunk.iter().map(|s| SlotValue { sku: s.clone(), inc: 10 * round, dec: 3 * round }).collect(),
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn edge(n: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreId::new("s1").unwrap();
    let opts = LedgerOptions::new(store.clone(), Currency::new("EUR").unwrap());
    let (handle, writer) = Ledger::open(dir.path(), &opts).unwrap().start_writer(64).unwrap();
    let skus = skus(n);
    let mut times = Vec::new();
    let mut cursor = Cursor::default();
    for round in 1..=ROUNDS {
        let pages = group(&store, ActorId::cloud(), &skus, round);
        let started = Instant::now();
        for page in pages {
            let from = cursor;
            cursor.store += page.slots.len() as u64;
            let ack = SyncAck {
                acked_version: 0,
                pushed_to: 0,
                cursor,
                cloud_time: HlcStamp { wall_ms: now_ms(), logical: 0, actor: ActorId::cloud() },
                caught_up: true,
            };
            let rows = Rows { stock: vec![page], ..Rows::default() };
            handle.apply_sync(ack, Some(MergedPage { from, rows, refused: vec![] })).await.unwrap();
        }
        times.push(started.elapsed());
    }
    drop(handle);
    writer.join();
    times
}

async fn cloud<S: Storage>(storage: S, n: usize) -> Vec<Duration> {
    storage.migrate().await.unwrap();
    let store = StoreId::new("s1").unwrap();
    storage.add_store(&store, [7; 32], now_ms()).await.unwrap();
    let skus = skus(n);
    let mut times = Vec::new();
    let mut version = 0;
    for round in 1..=ROUNDS {
        let pages = group(&store, ActorId::for_store(&store), &skus, round);
        let started = Instant::now();
        for page in pages {
            let from = version;
            version += page.slots.len() as u64;
            let push =
                Push { from_version: from, to_version: version, rows: Rows { stock: vec![page], ..Rows::default() } };
            let report = SyncReport {
                store: &store,
                sender: ActorId::for_store(&store),
                push: Some(&push),
                head_version: version,
                cursor: Cursor::default(),
                max_stamp: None,
                now_ms: now_ms(),
            };
            storage.push(report).await.unwrap();
        }
        times.push(started.elapsed());
    }
    times
}

/// The same pages written into a bare table of the edge's slot shape (DESIGN 5), with the
/// ledger's durability (WAL, synchronous=FULL) and page-cache settings.
fn bare_upsert(n: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("bare.db")).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(())).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    edge_agent::ledger::schema::tune(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE slots (store TEXT NOT NULL, sku TEXT NOT NULL, actor TEXT NOT NULL,
                             inc INTEGER NOT NULL, dec INTEGER NOT NULL, version INTEGER NOT NULL,
                             PRIMARY KEY (store, sku, actor)) STRICT, WITHOUT ROWID;
         CREATE INDEX slots_by_version ON slots (version);",
    )
    .unwrap();
    let store = StoreId::new("s1").unwrap();
    let skus = skus(n);
    let mut version = 0i64;
    let mut times = Vec::new();
    for round in 1..=ROUNDS {
        let pages = group(&store, ActorId::cloud(), &skus, round);
        let started = Instant::now();
        for page in pages {
            let tx = conn.unchecked_transaction().unwrap();
            {
                // The cheapest statement for what the round does: a plain insert of new rows in
                // round 1, a keyed update of existing ones after.
                let sql = if round == 1 {
                    "INSERT INTO slots (inc, dec, version, store, sku, actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                } else {
                    "UPDATE slots SET inc = max(inc, ?1), dec = max(dec, ?2), version = ?3
                      WHERE store = ?4 AND sku = ?5 AND actor = ?6"
                };
                let mut upsert = tx.prepare_cached(sql).unwrap();
                for slot in &page.slots {
                    version += 1;
                    upsert
                        .execute(rusqlite::params![
                            slot.inc as i64,
                            slot.dec as i64,
                            version,
                            page.store.as_str(),
                            slot.sku.as_str(),
                            page.actor.as_str()
                        ])
                        .unwrap();
                }
            }
            tx.commit().unwrap();
        }
        times.push(started.elapsed());
    }
    times
}

fn automerge(n: usize) -> Vec<Duration> {
    let keys: Vec<String> = (0..n).map(|i| format!("SKU-{i:07}")).collect();
    let mut source = AutoCommit::new();
    let mut replica = AutoCommit::new();
    let mut times = Vec::new();
    for round in 1..=ROUNDS {
        for key in &keys {
            if round == 1 {
                source.put(ROOT, key.as_str(), ScalarValue::counter(0)).unwrap();
            }
            source.increment(ROOT, key.as_str(), 7).unwrap();
        }
        source.commit();
        let started = Instant::now();
        replica.merge(&mut source).unwrap();
        times.push(started.elapsed());
    }
    times
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn main() {
    let n: usize = std::env::var("SLOT_MERGE_N").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let reference = automerge(n);
    let bare = bare_upsert(n);
    let edge = runtime.block_on(edge(n));
    let dir = tempfile::tempdir().unwrap();
    let cloud_sqlite = runtime.block_on(cloud(SqliteStorage::open(&dir.path().join("cloud.db")).unwrap(), n));
    let mut rows = vec![
        ("bare SQLite (ceiling)", bare),
        ("edge ledger (SQLite, FULL)", edge),
        ("cloud SQLite backend", cloud_sqlite),
    ];
    match postgres_conninfo() {
        Some(conninfo) => {
            let storage = runtime.block_on(cloud_sync::storage::postgres::PostgresStorage::connect(&conninfo)).unwrap();
            rows.push(("cloud PostgreSQL backend", runtime.block_on(cloud(storage, n))));
            drop_database(&conninfo);
        }
        None => eprintln!("PostgreSQL not reachable: its row is left out"),
    }

    println!("stock slot merges: {n} slots per round, {ROUNDS} rounds (round 1 inserts, later rounds update)");
    println!(
        "{:<30} {:>12} {:>12} {:>12}   vs automerge, per round",
        "merged by", "round 1/s", "round 2/s", "round 3/s"
    );
    let am: Vec<f64> = reference.iter().map(|d| rate(n, *d)).collect();
    println!("{:<30} {:>12.0} {:>12.0} {:>12.0}   reference", "automerge 0.12 (in memory)", am[0], am[1], am[2]);
    for (name, times) in rows {
        let r: Vec<f64> = times.iter().map(|d| rate(n, *d)).collect();
        let ratios: Vec<String> = r.iter().zip(&am).map(|(x, a)| format!("{:.1}x", x / a)).collect();
        println!("{name:<30} {:>12.0} {:>12.0} {:>12.0}   {}", r[0], r[1], r[2], ratios.join(" / "));
    }
}

/// A fresh database on the local PostgreSQL, if one answers.
fn postgres_conninfo() -> Option<String> {
    let admin = e2e_tests::cloud::pg_admin_conninfo();
    let name = format!("se_bench_{}", std::process::id());
    let ok = std::process::Command::new("psql")
        .arg(&admin)
        .args(["-qc", &format!("CREATE DATABASE {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| {
        let base: Vec<&str> = admin.split_whitespace().filter(|kv| !kv.starts_with("dbname=")).collect();
        format!("{} dbname={name}", base.join(" "))
    })
}

fn drop_database(conninfo: &str) {
    let name = conninfo.rsplit("dbname=").next().unwrap_or_default();
    let _ = std::process::Command::new("psql")
        .arg(e2e_tests::cloud::pg_admin_conninfo())
        .args(["-qc", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")])
        .output();
}
