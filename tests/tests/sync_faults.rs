//! Sync against a cloud that fails: answering 500, answering slowly (past the store's timeout,
//! so the cloud applies a push the store thinks failed), cutting its answer short, being
//! unreachable, and being killed in the middle of a multi-page sync. After each, the store's
//! outbox still holds what the cloud has not acknowledged, and once the cloud is back one
//! session completes and the cloud holds exactly the store's stock: nothing lost, nothing
//! counted twice. Also a cloud whose body limit is below the store's page size: the store sends
//! smaller pages. The real cloud-sync binary; the store's ledger and sync client as a library.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::cloud::{Backend, CloudFixture};
use e2e_tests::proxy::{Fault, FaultProxy};
use edge_agent::ledger::{Command, IdempotencyKey, Ledger, LedgerHandle, LedgerOptions, LedgerReader, WriterThread};
use edge_agent::sync::client::SyncClient;
use edge_agent::sync::{SessionError, Syncer};
use shared::{Currency, Sku, StoreId};

const SKUS: usize = 12_000;
const PAGE: u32 = 2_000;

fn sku(i: usize) -> Sku {
    Sku::new(format!("SKU-{i:05}")).unwrap()
}

async fn submit_all(handle: &LedgerHandle, commands: Vec<(String, Command)>) {
    let mut pending = tokio::task::JoinSet::new();
    for (key, cmd) in commands {
        let h = handle.clone();
        pending.spawn(async move { h.submit(IdempotencyKey::new(key).unwrap(), cmd).await.unwrap() });
    }
    while let Some(r) = pending.join_next().await {
        r.unwrap();
    }
}

async fn sell_round(handle: &LedgerHandle, round: usize) {
    let sales = (0..SKUS)
        .step_by(7)
        .map(|i| {
            let cmd = Command::Adjustment { sku: sku(i), movement: -1, reason: format!("sold in round {round}") };
            (format!("sale:{round}:{i}"), cmd)
        })
        .collect();
    submit_all(handle, sales).await;
}

/// Store s1's ledger after `skus` opening receipts of 50 units each, with a reader beside it.
struct OpenedStore {
    _dir: tempfile::TempDir,
    store: StoreId,
    handle: LedgerHandle,
    writer: WriterThread,
    reader: Arc<Mutex<LedgerReader>>,
}

impl OpenedStore {
    async fn open(skus: usize) -> OpenedStore {
        let store = StoreId::new("s1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = LedgerOptions::new(store.clone(), Currency::new("EUR").unwrap());
        let (handle, writer) = Ledger::open(dir.path(), &opts).unwrap().start_writer(4096).unwrap();
        let receipts = (0..skus)
            .map(|i| (format!("open:{i}"), Command::Receipt { sku: sku(i), quantity: 50, reference: "opening".into() }))
            .collect();
        submit_all(&handle, receipts).await;
        let reader = Arc::new(Mutex::new(LedgerReader::open(dir.path()).unwrap()));
        OpenedStore { _dir: dir, store, handle, writer, reader }
    }

    /// A syncer for this store against `url`, with `page_rows` rows per page.
    fn syncer(&self, url: &str, token: String, timeout: Duration, page_rows: u32) -> Syncer {
        let client = SyncClient::new(url, &self.store, token, timeout).unwrap();
        Syncer::new(self.store.clone(), client, self.reader.clone(), self.handle.clone(), page_rows)
    }
}

fn expect_failure(outcome: Result<edge_agent::sync::SessionReport, SessionError>, code: &str, fault: Fault) {
    match outcome {
        Err(e) => assert_eq!(e.code(), code, "{fault:?}: {e}"),
        Ok(report) => panic!("{fault:?}: the session succeeded through the fault: {report:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_counted_twice_when_the_cloud_fails() {
    let mut cloud = CloudFixture::start(Backend::Sqlite);
    let token = cloud.add_store("s1");
    let proxy = FaultProxy::start(cloud.addr).await;

    let opened = OpenedStore::open(SKUS).await;
    // The store gives up on an answer after 4 s: long enough for a debug cloud on a loaded
    // machine to answer a full page, short enough to wait out the slow fault below.
    let syncer = opened.syncer(&proxy.url(), token, Duration::from_secs(4), PAGE);
    let OpenedStore { _dir, store: _, handle, writer, reader } = opened;
    let outbox = || reader.lock().unwrap().outbox_depth().unwrap();

    // Each fault fails the session; the outbox keeps everything not acknowledged; sales go on.
    let faults = [
        (Fault::Status500, "SYNC_UNAVAILABLE"),
        (Fault::Slow(Duration::from_secs(6)), "SYNC_UNREACHABLE"),
        (Fault::Truncate, "SYNC_BAD_ANSWER"),
        (Fault::Down, "SYNC_UNREACHABLE"),
    ];
    for (round, (fault, code)) in faults.into_iter().enumerate() {
        proxy.set(fault);
        let before = outbox();
        expect_failure(syncer.session().await, code, fault);
        assert_eq!(outbox(), before, "{fault:?}: a failed exchange acknowledges nothing");
        sell_round(&handle, round).await;
    }
    // The slow request reaches the cloud after the store gave up on it: a duplicate to come.
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Killed in the middle of a multi-page sync.
    proxy.set(Fault::None);
    let forwarded = proxy.counts().forwarded;
    let session = tokio::spawn(async move {
        let outcome = syncer.session().await;
        (syncer, outcome)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.counts().forwarded < forwarded + 2 {
        assert!(std::time::Instant::now() < deadline, "the session never got to its second exchange");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cloud.kill();
    let (syncer, outcome) = session.await.unwrap();
    assert!(outcome.is_err(), "the session cannot finish with the cloud dead: {outcome:?}");
    assert!(outbox() > 0, "the pages after the kill are still in the outbox");
    sell_round(&handle, 99).await;

    // The cloud is back: one session completes everything.
    cloud.serve();
    let report = syncer.session().await.unwrap();
    assert!(report.pushed_rows > 0);
    assert_eq!(outbox(), 0, "everything acknowledged");
    let position = reader.lock().unwrap().sync_position().unwrap();
    assert_eq!(position.pushed_version, position.head_version);

    // Exactly the store's stock in the cloud, SKU by SKU (a sample across the range, and every
    // SKU sold in each round).
    for i in (0..SKUS).step_by(97).chain((0..SKUS).step_by(7).take(50)) {
        let s = sku(i);
        let local = reader.lock().unwrap().stock(&s).unwrap().on_hand;
        assert_eq!(cloud.chain_total(&s).await, local, "{s}");
    }
    let (_, stores) = cloud.hq("GET", "/v1/hq/stores", None).await;
    let status = &stores["stores"].as_array().unwrap()[0];
    assert_eq!(status["push_lag_versions"].as_u64(), Some(0), "{status}");
    drop(syncer);
    drop(handle);
    writer.join();
}

/// An operator set the cloud's body limit below what the store's pages need (413 for the
/// first push, a full page of ~300 KB): the store halves its pages until they fit, and one
/// session still moves every change, acknowledged once and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_too_large_for_the_cloud_are_sent_in_smaller_pages() {
    const OPENED: usize = 20_000;
    let cloud = CloudFixture::start_with(Backend::Sqlite, "max_body_bytes = 4096\n");
    let token = cloud.add_store("s1");
    let opened = OpenedStore::open(OPENED).await;
    let syncer = opened.syncer(&cloud.url(), token, Duration::from_secs(10), shared::sync::MAX_PAGE_ROWS);
    let OpenedStore { _dir, store: _, handle, writer, reader } = opened;

    let report = syncer.session().await.unwrap();
    assert_eq!(report.pushed_rows, OPENED, "every opening receipt pushed once: {report:?}");
    assert!(report.pages_too_large >= 4, "{report:?}");
    assert!(syncer.page_rows() <= shared::sync::MAX_PAGE_ROWS / 16, "pages were made smaller: {}", syncer.page_rows());
    assert_eq!(reader.lock().unwrap().outbox_depth().unwrap(), 0, "everything acknowledged");
    for i in (0..OPENED).step_by(1_499) {
        assert_eq!(cloud.chain_total(&sku(i)).await, 50, "{}", sku(i));
    }

    // The smaller size sticks (for an hour): the next changes go out without a refusal.
    sell_round(&handle, 0).await;
    let before = syncer.page_rows();
    let next = syncer.session().await.unwrap();
    assert!(next.pushed_rows > 0);
    assert_eq!((next.pages_too_large, syncer.page_rows()), (0, before), "{next:?}");
    assert_eq!(reader.lock().unwrap().outbox_depth().unwrap(), 0);
    drop(syncer);
    drop(handle);
    writer.join();
}

/// The same through the daemon: `storectl sync status` tells the technician that pages were cut
/// and what to change, and still everything reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_says_when_the_cloud_made_it_send_smaller_pages() {
    use e2e_tests::store::{Seed, StoreFixture};
    const EXTRA: usize = 2_000;
    let cloud = CloudFixture::start_with(Backend::Sqlite, "max_body_bytes = 4096\n");
    let token_dir = tempfile::tempdir().unwrap();
    let section = cloud.store_section("s1", token_dir.path(), &cloud.url(), "interval_ms = 3600000\n");
    let store = StoreFixture::custom("s1", &[], "", &section, Seed::StockOnly);
    // Received before the daemon starts: its first push (~40 KB) is ten times the cloud's limit.
    {
        let opts = LedgerOptions::new(StoreId::new("s1").unwrap(), Currency::new("EUR").unwrap());
        let (handle, writer) = Ledger::open(&store.data, &opts).unwrap().start_writer(4_096).unwrap();
        let receipts = (0..EXTRA)
            .map(|i| (format!("extra:{i}"), Command::Receipt { sku: sku(i), quantity: 50, reference: "extra".into() }))
            .collect();
        submit_all(&handle, receipts).await;
        drop(handle);
        writer.join();
    }
    let daemon = store.start();
    e2e_tests::synced::until("the cloud holds everything", || store.reader().outbox_depth().unwrap() == 0).await;
    assert_eq!(cloud.chain_total(&sku(EXTRA - 1)).await, 50);

    let out = store.storectl(&["--json", "sync", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = &answer["status"];
    let (rows, configured) = (status["page_rows"].as_u64().unwrap(), status["configured_page_rows"].as_u64().unwrap());
    assert_eq!(configured, u64::from(shared::sync::MAX_PAGE_ROWS), "{answer}");
    assert!(rows <= u64::from(shared::sync::MAX_PAGE_ROWS) / 32, "{answer}");
    assert!(status["pages_too_large"].as_u64().unwrap() >= 3, "{answer}");
    let human = store.storectl(&["sync", "status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains(&format!("pages cut to {rows} rows (of {configured})")) && text.contains("server.max_body_bytes"),
        "{text}"
    );
    daemon.stop();
}
