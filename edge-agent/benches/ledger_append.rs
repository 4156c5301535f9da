//! Durable ledger appends with group commit, beside a bare rusqlite batched insert loop of the
//! same row size, in the same process and on the same disk, so the ratio cancels the machine's
//! noise. Each batch size is measured on both sides: the bare loop commits that many rows per
//! transaction; the ledger gets twice that many concurrent callers, each awaiting its durable
//! acknowledgement, and `batch_max` of that size. Prints a table.
//!
//! Run: `cargo bench -p edge-agent --bench ledger_append` (`BENCH_EVENTS` sets the events per
//! row, default 100,000; `BENCH_BATCHES=64,1024` picks the batch sizes).

use std::time::{Duration, Instant};

use edge_agent::ledger::{Command, EventBody, IdempotencyKey, Ledger, LedgerOptions, SaleLine, Tender, WriterStats};
use rusqlite::{params, Connection};
use shared::{Currency, Money, Sku, StoreId};

const SKUS: usize = 1_000;
const BATCH_SIZES: [usize; 3] = [64, 256, 1024];
/// The bare loop's actor column: as long as the ledger's (`store:{store}:{16 hex digits}`).
const BARE_ACTOR: &str = "store:bench:0123456789abcdef";

fn sale(i: usize, eur: Currency) -> Command {
    Command::Sale {
        lines: vec![SaleLine {
            sku: Sku::new(format!("SKU-{:06}", i % SKUS)).unwrap(),
            quantity: 1,
            line_total: Money::new(199, eur),
            price: None,
        }],
        tender: Tender::Card,
    }
}

fn key(i: usize) -> String {
    format!("lane-03:basket-{i:09}")
}

/// A plain table with the event table's columns and row sizes, filled `batch` rows per
/// transaction with `synchronous=FULL` and the ledger's page-cache settings: the fastest
/// durable insert loop rusqlite offers. With `unique_key`, the idempotency key gets the
/// unique index the ledger needs, to show what that alone costs; with `slots` as well, each
/// transaction also updates the stock slot of every SKU its rows sold (a table shaped like
/// `stock_slots`, with its key and version indexes): the SQLite work of the ledger's
/// projection in the same transaction, without the ledger's channel, hashing and planning.
fn bare_loop(events: usize, batch: usize, body_len: usize, unique_key: bool) -> Duration {
    bare_loop_with(events, batch, body_len, unique_key, false)
}

fn bare_loop_with(events: usize, batch: usize, body_len: usize, unique_key: bool, slots: bool) -> Duration {
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
    if slots {
        conn.execute_batch(
            "CREATE TABLE slots (id INTEGER PRIMARY KEY, store TEXT NOT NULL, sku TEXT NOT NULL, actor TEXT NOT NULL,
                                 inc INTEGER NOT NULL, dec INTEGER NOT NULL, version INTEGER NOT NULL);
             CREATE UNIQUE INDEX slots_key ON slots (store, sku, actor);
             CREATE INDEX slots_by_version ON slots (version);",
        )
        .unwrap();
        for s in 0..SKUS {
            conn.execute(
                "INSERT INTO slots (id, store, sku, actor, inc, dec, version) VALUES (?1, 'bench', ?2, ?3, 0, 0, 0)",
                params![s as i64 + 1, format!("SKU-{s:06}"), BARE_ACTOR],
            )
            .unwrap();
        }
    }
    let mut version = 0i64;
    let body = vec![7u8; body_len];
    let hash = [9u8; 32];
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut stmt = tx.prepare_cached("INSERT INTO bare VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)").unwrap();
            for _ in 0..batch.min(events - i) {
                i += 1;
                stmt.execute(params![
                    i as i64,
                    1_800_000_000_000i64 + i as i64,
                    0,
                    BARE_ACTOR,
                    "sale",
                    key(i),
                    &body,
                    &hash[..],
                    &hash[..]
                ])
                .unwrap();
            }
        }
        if slots {
            let mut stmt = tx.prepare_cached("UPDATE slots SET dec = dec + 1, version = ?1 WHERE id = ?2").unwrap();
            let first = i - batch.min(i);
            let touched: std::collections::BTreeSet<usize> = (first..i).map(|e| e % SKUS).collect();
            for s in touched {
                version += 1;
                stmt.execute(params![version, s as i64 + 1]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    started.elapsed()
}

/// CPU time so far of this process's threads named `name` (from `/proc/self/task/*/schedstat`,
/// nanoseconds on a CPU), so the table can say where the ledger's time goes without a profiler.
fn thread_cpu(name: &str) -> Duration {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let on_cpu_ns: u64 = stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        total += Duration::from_nanos(on_cpu_ns);
    }
    total
}

/// CPU per event of the ledger's threads in one run.
#[derive(Default, Clone, Copy)]
struct LedgerCpu {
    writer: Duration,
    callers: Duration,
    replier: Duration,
}

/// The real path: commands through the writer's channel from concurrent callers, each waiting
/// for its durable acknowledgement; events validated, hashed and chained, stock slots updated.
fn ledger(events: usize, batch_max: usize, callers: usize) -> (Duration, WriterStats, LedgerCpu) {
    let dir = tempfile::tempdir().unwrap();
    let eur = Currency::new("EUR").unwrap();
    let mut opts = LedgerOptions::new(StoreId::new("bench").unwrap(), eur);
    opts.batch_max = batch_max;
    let (handle, writer) = Ledger::open(dir.path(), &opts).unwrap().start_writer(8192).unwrap();
    // Callers run on the daemon's own runtime shape (`[runtime] worker_threads`, default 1: the
    // writer and replier threads have the other core).
    let workers = edge_agent::config::RuntimeSection::default().worker_threads;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).build().unwrap();
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
    // The writer and replier threads are this run's (earlier runs' have ended); the runtime's
    // worker ran only the callers.
    let cpu = LedgerCpu {
        writer: thread_cpu("ledger-writer") / events as u32,
        callers: thread_cpu("tokio-rt-worker") / events as u32,
        replier: thread_cpu("ledger-replier") / events as u32,
    };
    drop(handle);
    writer.join();
    (elapsed, stats, cpu)
}

fn main() {
    let events: usize = std::env::var("BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let eur = Currency::new("EUR").unwrap();
    let body_len = match sale(0, eur) {
        Command::Sale { lines, tender } => {
            EventBody::Sale { lines, tender, total: Money::new(199, eur) }.encode().len()
        }
        _ => unreachable!("sale() builds a sale"),
    };
    let rate = |d: Duration| events as f64 / d.as_secs_f64();

    println!(
        "durable appends, WAL, synchronous=FULL, {events} events per row, event body {body_len} bytes, {SKUS} SKUs"
    );
    println!(
        "{:>6} {:>12} {:>12} {:>9} {:>12} {:>9} {:>12} {:>9} {:>10} {:>11} {:>10} {:>22} {:>9}",
        "batch",
        "bare ev/s",
        "+uniq ev/s",
        "+uniq x",
        "+slots ev/s",
        "+slots x",
        "ledger ev/s",
        "ledger x",
        "mean batch",
        "writer busy",
        "commit us",
        "CPU ns/ev wr/call/rep",
        "target"
    );
    let batches: Vec<usize> = match std::env::var("BENCH_BATCHES") {
        Ok(list) => list.split(',').filter_map(|b| b.trim().parse().ok()).collect(),
        Err(_) => BATCH_SIZES.to_vec(),
    };
    for batch in batches {
        // Two rounds each, alternating, best kept: the disk's mood affects both sides alike.
        let (mut bare, mut unique, mut with_slots, mut led) =
            (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
        let mut stats = WriterStats::default();
        let mut cpu = LedgerCpu::default();
        for _ in 0..2 {
            bare = bare.min(bare_loop(events, batch, body_len, false));
            unique = unique.min(bare_loop(events, batch, body_len, true));
            with_slots = with_slots.min(bare_loop_with(events, batch, body_len, true, true));
            let (d, s, c) = ledger(events, batch, batch * 2);
            if d < led {
                led = d;
                stats = s;
                cpu = c;
            }
        }
        let ratio = rate(led) / rate(bare);
        let met = ratio >= 0.5 && rate(led) >= 100_000.0;
        println!(
            "{:>6} {:>12.0} {:>12.0} {:>8.2}x {:>12.0} {:>8.2}x {:>12.0} {:>8.2}x {:>10.0} {:>10.0}% {:>10.0} {:>22} {:>9}",
            batch,
            rate(bare),
            rate(unique),
            rate(unique) / rate(bare),
            rate(with_slots),
            rate(with_slots) / rate(bare),
            rate(led),
            ratio,
            stats.events as f64 / stats.batches.max(1) as f64,
            100.0 * stats.busy_micros as f64 / led.as_micros().max(1) as f64,
            stats.commit_micros as f64 / stats.batches.max(1) as f64,
            format!("{} / {} / {}", cpu.writer.as_nanos(), cpu.callers.as_nanos(), cpu.replier.as_nanos()),
            if met { "met" } else { "NOT met" }
        );
    }
    let (single, _, _) = ledger(events.min(2_000), 1, 16);
    println!(
        "one event per transaction (no group commit): {:.0} events/s",
        events.min(2_000) as f64 / single.as_secs_f64()
    );
    println!("target: ledger >= 0.5x the bare loop at the same batch size, and >= 100000 events/s");
}
