//! Durable ledger appends with group commit, beside a bare rusqlite batched insert loop of the
//! same row size, in the same process and on the same disk, so the ratio cancels the machine's
//! noise. Prints a table. `BENCH_EVENTS` sets the event count (default 200,000).
//!
//! Run: `cargo bench -p edge-agent --bench ledger_append`

use std::time::{Duration, Instant};

use edge_agent::ledger::{Command, EventBody, IdempotencyKey, Ledger, LedgerOptions, SaleLine, Tender};
use rusqlite::{params, Connection};
use shared::{Currency, Money, Sku, StoreId};

const SKUS: usize = 1_000;
const BATCH: usize = 1024;
const CALLERS: usize = 2048;

fn sale(i: usize, eur: Currency) -> Command {
    Command::Sale {
        lines: vec![SaleLine { sku: Sku::new(format!("SKU-{:06}", i % SKUS)).unwrap(), quantity: 1, line_total: Money::new(199, eur) }],
        tender: Tender::Card,
    }
}

fn key(i: usize) -> String {
    format!("lane-03:basket-{i:09}")
}

/// A plain table with the event table's columns and row sizes, filled in transactions of
/// `BATCH` rows with `synchronous=FULL`: the fastest durable insert loop rusqlite offers.
fn bare_loop(events: usize, body_len: usize, unique_key: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("bare.db")).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(())).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    edge_agent::ledger::schema::tune(&conn).unwrap();
    conn.execute_batch(
        "CREATE TABLE bare (seq INTEGER PRIMARY KEY, hlc_wall INTEGER, hlc_logical INTEGER, actor TEXT, kind TEXT,
                            idem_key TEXT, body BLOB, prev_hash BLOB, hash BLOB)",
    )
    .unwrap();
    if unique_key {
        conn.execute_batch("CREATE UNIQUE INDEX bare_key ON bare (idem_key)").unwrap();
    }
    let body = vec![7u8; body_len];
    let hash = [9u8; 32];
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut stmt = tx.prepare_cached("INSERT INTO bare VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)").unwrap();
            for _ in 0..BATCH.min(events - i) {
                i += 1;
                stmt.execute(params![i as i64, 1_800_000_000_000i64 + i as i64, 0, "store:bench", "sale", key(i), &body, &hash[..], &hash[..]]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    started.elapsed()
}

/// The real path: commands through the writer's channel from many concurrent callers, each
/// waiting for its durable acknowledgement; events hashed, stock slots updated.
fn ledger(events: usize, batch_max: usize, callers: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let eur = Currency::new("EUR").unwrap();
    let mut opts = LedgerOptions::new(StoreId::new("bench").unwrap(), eur);
    opts.batch_max = batch_max;
    let (handle, writer) = Ledger::open(dir.path(), &opts).unwrap().start_writer(8192).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..callers {
            let handle = handle.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = c;
                while i < events {
                    handle.submit(IdempotencyKey::new(key(i)).unwrap(), sale(i, eur)).await.unwrap();
                    i += callers;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed();
    let stats = handle.stats();
    eprintln!(
        "  ledger run: {} events in {} batches (mean {:.0} per fsync), writer busy {:.3} s of {:.3} s",
        stats.events,
        stats.batches,
        stats.events as f64 / stats.batches.max(1) as f64,
        stats.busy_micros as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    drop(handle);
    writer.join();
    elapsed
}

fn main() {
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let eur = Currency::new("EUR").unwrap();
    let body_len = match sale(0, eur) {
        Command::Sale { lines, tender } => {
            let total = Money::new(199, eur);
            EventBody::Sale { lines, tender, total }.encode().len()
        }
        _ => unreachable!(),
    };
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();

    // Two rounds each, alternating, best kept: the disk's mood affects both sides alike.
    let mut bare = Duration::MAX;
    let mut bare_unique = Duration::MAX;
    let mut grouped = Duration::MAX;
    for _ in 0..2 {
        bare = bare.min(bare_loop(events, body_len, false));
        bare_unique = bare_unique.min(bare_loop(events, body_len, true));
        grouped = grouped.min(ledger(events, BATCH, CALLERS));
    }
    let single_events = events.min(2_000);
    let single = ledger(single_events, 1, 16);

    println!("durable ledger appends, synchronous=FULL, WAL, event body {body_len} bytes, {SKUS} SKUs");
    println!("{:<52} {:>9} {:>9} {:>12} {:>8}", "what", "events", "seconds", "events/s", "ratio");
    let row = |what: &str, n: usize, d: Duration| {
        println!("{:<52} {:>9} {:>9.3} {:>12.0} {:>7.2}x", what, n, d.as_secs_f64(), rate(n, d), rate(n, d) / rate(events, bare));
    };
    row(&format!("bare rusqlite insert loop, {BATCH} rows/transaction"), events, bare);
    row("  same, plus a unique index on the idempotency key", events, bare_unique);
    row(&format!("ledger: group commit, batch<={BATCH}, {CALLERS} callers"), events, grouped);
    row("ledger: one event per transaction (no grouping)", single_events, single);
    let ratio = rate(events, grouped) / rate(events, bare);
    println!(
        "target: ledger >= 0.5x bare and >= 100000 events/s: {}",
        if ratio >= 0.5 && rate(events, grouped) >= 100_000.0 { "MET" } else { "NOT MET" }
    );
}
