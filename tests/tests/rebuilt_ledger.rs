//! A store whose ledger was lost (a dead disk) starts again with an empty one under the same
//! store id, sells before its first sync, then syncs. Documents today's behaviour: the new
//! ledger writes under the same actor as the old one (`ActorId::for_store`), so its first own
//! slots are merged by per-slot max with the larger counts the cloud holds for that actor, and
//! what it sold before catching up is hidden. The real cloud-sync binary; the ledgers and the
//! sync client as a library.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::cloud::{Backend, CloudFixture};
use edge_agent::ledger::{Command, IdempotencyKey, Ledger, LedgerHandle, LedgerOptions, LedgerReader, WriterThread};
use edge_agent::sync::client::SyncClient;
use edge_agent::sync::Syncer;
use shared::{Currency, Sku, StoreId};

fn store_ledger(dir: &std::path::Path) -> (LedgerHandle, WriterThread, Arc<Mutex<LedgerReader>>) {
    let opts = LedgerOptions::new(StoreId::new("s1").unwrap(), Currency::new("EUR").unwrap());
    let (handle, writer) = Ledger::open(dir, &opts).unwrap().start_writer(64).unwrap();
    let reader = Arc::new(Mutex::new(LedgerReader::open(dir).unwrap()));
    (handle, writer, reader)
}

async fn adjust(handle: &LedgerHandle, key: &str, sku: &Sku, movement: i64) {
    let cmd = Command::Adjustment { sku: sku.clone(), movement, reason: "test".into() };
    handle.submit(IdempotencyKey::new(key).unwrap(), cmd).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_of_a_rebuilt_ledger_before_its_first_sync_are_hidden_by_the_old_counts() {
    let cloud = CloudFixture::start(Backend::Sqlite);
    let token = cloud.add_store("s1");
    let store = StoreId::new("s1").unwrap();
    let sku = Sku::new("MILK-1L").unwrap();
    let syncer = |handle: &LedgerHandle, reader: &Arc<Mutex<LedgerReader>>| {
        let client = SyncClient::new(&cloud.url(), &store, token.clone(), Duration::from_secs(10)).unwrap();
        Syncer::new(store.clone(), client, reader.clone(), handle.clone(), 1_000)
    };

    // The old ledger: 50 received, 10 sold, all synced.
    let old_dir = tempfile::tempdir().unwrap();
    let (handle, writer, reader) = store_ledger(old_dir.path());
    adjust(&handle, "receipt", &sku, 50).await;
    adjust(&handle, "sold-10", &sku, -10).await;
    syncer(&handle, &reader).session().await.unwrap();
    assert_eq!(cloud.chain_total(&sku).await, 40);
    drop(handle);
    writer.join();
    drop(old_dir);

    // The disk is replaced: an empty ledger, offline at first, sells 5, then syncs.
    let new_dir = tempfile::tempdir().unwrap();
    let (handle, writer, reader) = store_ledger(new_dir.path());
    adjust(&handle, "sold-5", &sku, -5).await;
    assert_eq!(reader.lock().unwrap().stock(&sku).unwrap().on_hand, -5, "offline: only what it sold");
    let sync = syncer(&handle, &reader);
    sync.session().await.unwrap();
    sync.session().await.unwrap();

    // FIXME: 35 units are on the shelf (50 - 10 - 5), and both the cloud and the store should
    // say 35. Today the new ledger's slot (0 in, 5 out) is merged with the cloud's (50 in, 10
    // out) for the same actor by per-slot max, so the 5 sales vanish and both say 40. A fix
    // needs a new actor for each ledger the store starts (shared, cloud-sync's push check).
    assert_eq!(cloud.chain_total(&sku).await, 40, "today's behaviour; should be 35");
    assert_eq!(reader.lock().unwrap().stock(&sku).unwrap().on_hand, 40, "today's behaviour; should be 35");
    // The new ledger's own chain is intact.
    assert!(reader.lock().unwrap().verify().unwrap().is_ok());
    drop(sync);
    drop(handle);
    writer.join();
}
