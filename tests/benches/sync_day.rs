//! A store offline for a day, then one sync session on loopback: 100k SKUs in the store, 50k
//! changed slots (40k sold at the store, 10k moved by HQ transfers in the cloud), pushed and
//! pulled through the real HTTP service and the real edge sync client into the real ledger.
//! Beside it, the reference measured in the same run: the same bytes POSTed on the same
//! loopback to a handler that only reads them.
//! Targets (DESIGN section 10): < 1 s, <= 20 bytes per changed slot on the wire.
//!
//! `cargo bench -p e2e-tests --bench sync_day` (`SYNC_DAY_SKUS`, `SYNC_DAY_CHANGED` resize it).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud_sync::http::{router, Settings};
use cloud_sync::price_guard::Bounds;
use cloud_sync::storage::sqlite::SqliteStorage;
use cloud_sync::storage::{CloudMovement, CloudWrites, Storage};
use edge_agent::ledger::{Command, IdempotencyKey, Ledger, LedgerHandle, LedgerOptions, LedgerReader};
use edge_agent::sync::client::SyncClient;
use edge_agent::sync::Syncer;
use shared::sync::MAX_PAGE_ROWS;
use shared::{Currency, Sku, StoreId};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn sku(i: usize) -> Sku {
    Sku::new(format!("SKU-{i:07}")).unwrap()
}

/// Submits many commands at once so the writer batches them (as lanes and devices do).
async fn submit_all(handle: &LedgerHandle, commands: Vec<(String, Command)>) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in commands.chunks(1024) {
        let (handle, chunk) = (handle.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let mut pending = tokio::task::JoinSet::new();
            for (key, cmd) in chunk {
                let h = handle.clone();
                pending.spawn(async move { h.submit(IdempotencyKey::new(key).unwrap(), cmd).await.unwrap() });
            }
            while pending.join_next().await.is_some() {}
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

async fn run(skus: usize, changed: usize) {
    let store = StoreId::new("s1").unwrap();
    let cloud_dir = tempfile::tempdir().unwrap();
    let storage = SqliteStorage::open(&cloud_dir.path().join("cloud.db")).unwrap();
    storage.migrate().await.unwrap();
    let token = "bench-token-0123456789abcdef";
    storage.add_store(&store, cloud_sync::auth::sha256(token), cloud_sync::http::now_ms()).await.unwrap();
    let settings = Settings {
        max_body_bytes: 64 << 20,
        max_skew_ms: 300_000,
        page_rows: MAX_PAGE_ROWS,
        price_bounds: Bounds { decrease_pct: 60, increase_pct: 100 },
        pickup_window_minutes: 2_880,
    };
    let app = router(storage.clone(), settings)
        .route("/reference", axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let store_dir = tempfile::tempdir().unwrap();
    let opts = LedgerOptions::new(store.clone(), Currency::new("EUR").unwrap());
    let (handle, writer) = Ledger::open(store_dir.path(), &opts).unwrap().start_writer(8192).unwrap();
    let receipts = (0..skus)
        .map(|i| (format!("open:{i}"), Command::Receipt { sku: sku(i), quantity: 1_000, reference: "opening".into() }))
        .collect();
    submit_all(&handle, receipts).await;
    let syncer = Syncer::new(
        store.clone(),
        SyncClient::new(&format!("http://{addr}"), &store, token.into(), Duration::from_secs(60)).unwrap(),
        Arc::new(Mutex::new(LedgerReader::open(store_dir.path()).unwrap())),
        handle.clone(),
        MAX_PAGE_ROWS,
    );
    let first = syncer.session().await.unwrap();
    assert_eq!(first.pushed_rows, skus, "the opening stock reaches the cloud");

    // The day offline: sales at the store, transfers at HQ.
    let sold = changed * 4 / 5;
    let moved = changed - sold;
    let sales = (0..sold)
        .map(|i| {
            (
                format!("adj:{i}"),
                Command::Adjustment { sku: sku(i * skus / sold.max(1)), movement: -3, reason: "sold".into() },
            )
        })
        .collect();
    submit_all(&handle, sales).await;
    let transfers = CloudWrites {
        op_id: Some("bench-transfers".into()),
        stock: (0..moved)
            .map(|i| CloudMovement { store: store.clone(), sku: sku(skus - 1 - i * skus / moved.max(1)), movement: 5 })
            .collect(),
        ..CloudWrites::default()
    };
    storage.apply(&transfers, cloud_sync::http::now_ms()).await.unwrap();

    let started = Instant::now();
    let report = syncer.session().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!((report.pushed_rows, report.pulled_rows), (sold, moved), "every changed slot moved once");

    // Reference: the same bytes through the same loopback and HTTP stack, read and dropped.
    let client = e2e_tests::cloud::http_client();
    let bytes = vec![0x5a_u8; report.bytes.sent + report.bytes.received];
    let reference_started = Instant::now();
    for _ in 0..report.exchanges {
        let part = bytes.len() / report.exchanges.max(1);
        let answer = client.post(format!("http://{addr}/reference")).body(bytes[..part].to_vec()).send().await.unwrap();
        assert!(answer.status().is_success());
    }
    let reference = reference_started.elapsed();

    let wire = report.bytes.sent + report.bytes.received;
    println!("one day offline: {skus} SKUs, {changed} changed slots ({sold} pushed, {moved} pulled)");
    println!("{:<44} {:>12} {:>14} {:>12}", "", "time", "wire bytes", "bytes/slot");
    println!(
        "{:<44} {:>10.0}ms {:>14} {:>12.1}",
        format!("sync session ({} exchanges)", report.exchanges),
        elapsed.as_secs_f64() * 1e3,
        wire,
        wire as f64 / changed as f64
    );
    println!(
        "{:<44} {:>10.0}ms {:>14} {:>12}",
        "reference: same bytes POSTed, read, dropped",
        reference.as_secs_f64() * 1e3,
        wire,
        "-"
    );
    println!("session / reference: {:.1}x", elapsed.as_secs_f64() / reference.as_secs_f64());
    drop(syncer);
    drop(handle);
    writer.join();
}

fn main() {
    let skus = env("SYNC_DAY_SKUS", 100_000);
    let changed = env("SYNC_DAY_CHANGED", 50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run(skus, changed));
}
