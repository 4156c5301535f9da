//! A store whose ledger was lost (a dead disk) starts again with an empty one under the same
//! store id, sells before its first sync, then syncs. The new ledger writes as a new actor of
//! the store, so the cloud's counts of the old ledger come back to it as another actor's slots
//! and what it sold before catching up is counted on top of them, not hidden by a per-slot max
//! with the same actor's larger counts. The real cloud-sync binary; the ledgers and the sync
//! client as a library.

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

/// The real cloud with store s1 signed up; `syncer` syncs one of s1's ledgers with it.
struct Cloud {
    cloud: CloudFixture,
    token: String,
}

impl Cloud {
    fn start() -> Cloud {
        let cloud = CloudFixture::start(Backend::Sqlite);
        let token = cloud.add_store("s1");
        Cloud { cloud, token }
    }

    fn syncer(&self, handle: &LedgerHandle, reader: &Arc<Mutex<LedgerReader>>) -> Syncer {
        let store = StoreId::new("s1").unwrap();
        let client = SyncClient::new(&self.cloud.url(), &store, self.token.clone(), Duration::from_secs(10)).unwrap();
        Syncer::new(store, client, reader.clone(), handle.clone(), 1_000)
    }
}

async fn adjust(handle: &LedgerHandle, key: &str, sku: &Sku, movement: i64) {
    let cmd = Command::Adjustment { sku: sku.clone(), movement, reason: "test".into() };
    handle.submit(IdempotencyKey::new(key).unwrap(), cmd).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_of_a_rebuilt_ledger_before_its_first_sync_are_counted() {
    let cloud = Cloud::start();
    let sku = Sku::new("MILK-1L").unwrap();

    // The old ledger: 50 received, 10 sold, all synced.
    let old_dir = tempfile::tempdir().unwrap();
    let (handle, writer, reader) = store_ledger(old_dir.path());
    let old_actor = reader.lock().unwrap().actor().unwrap();
    adjust(&handle, "receipt", &sku, 50).await;
    adjust(&handle, "sold-10", &sku, -10).await;
    cloud.syncer(&handle, &reader).session().await.unwrap();
    assert_eq!(cloud.cloud.chain_total(&sku).await, 40);
    drop(handle);
    writer.join();
    drop(old_dir);

    // The disk is replaced: an empty ledger, offline at first, sells 5, then syncs.
    let new_dir = tempfile::tempdir().unwrap();
    let (handle, writer, reader) = store_ledger(new_dir.path());
    let new_actor = reader.lock().unwrap().actor().unwrap();
    assert_ne!(new_actor, old_actor, "a new ledger writes as a new actor");
    let store = StoreId::new("s1").unwrap();
    assert!(new_actor.is_of_store(&store) && old_actor.is_of_store(&store));
    adjust(&handle, "sold-5", &sku, -5).await;
    assert_eq!(reader.lock().unwrap().stock(&sku).unwrap().on_hand, -5, "offline: only what it sold");
    let sync = cloud.syncer(&handle, &reader);
    sync.session().await.unwrap();
    sync.session().await.unwrap();

    // 35 units are on the shelf (50 - 10 - 5): the cloud and the store both say so, the store
    // holding the old ledger's slot as the cloud kept it beside its own.
    assert_eq!(cloud.cloud.chain_total(&sku).await, 35);
    let stock = reader.lock().unwrap().stock(&sku).unwrap();
    assert_eq!(stock.on_hand, 35);
    let slot = |actor: &shared::ActorId| stock.slots.iter().find(|(a, _)| a == actor.as_str()).map(|(_, s)| *s);
    assert_eq!(slot(&old_actor), Some(shared::Slot { inc: 50, dec: 10 }), "{stock:?}");
    assert_eq!(slot(&new_actor), Some(shared::Slot { inc: 0, dec: 5 }), "{stock:?}");
    // The new ledger's own chain is intact.
    assert!(reader.lock().unwrap().verify().unwrap().is_ok());
    // HQ sees which ledger the store syncs with now, and that it has pulled everything.
    let (status, stores) = cloud.cloud.hq("GET", "/v1/hq/stores", None).await;
    assert_eq!(status, 200, "{stores}");
    let s1 = &stores["stores"][0];
    assert_eq!((s1["ledger_actor"].as_str(), s1["pending_rows"].as_u64()), (Some(new_actor.as_str()), Some(0)), "{s1}");

    // More sales after the catch-up reach the cloud on the new actor alone.
    adjust(&handle, "sold-2", &sku, -2).await;
    sync.session().await.unwrap();
    assert_eq!(cloud.cloud.chain_total(&sku).await, 33);
    assert_eq!(reader.lock().unwrap().stock(&sku).unwrap().on_hand, 33);
    drop(sync);
    drop(handle);
    writer.join();
}

/// A lost ledger restored from a `storectl backup` (here the library call behind it) that
/// sells before its first sync. `sold_after_backup` more units were sold and synced by the lost
/// ledger after the backup (the cloud holds them; the backup does not); `unsynced_in_backup`
/// units were sold before the backup and never reached the cloud. Returns what the cloud and
/// the restored store say after it sold 5 and synced.
async fn restore_and_sell(sold_after_backup: i64, unsynced_in_backup: i64) -> (i64, i64) {
    let cloud = Cloud::start();
    let sku = Sku::new("MILK-1L").unwrap();

    let (lost_dir, restored_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (handle, writer, reader) = store_ledger(lost_dir.path());
    adjust(&handle, "receipt", &sku, 50).await;
    cloud.syncer(&handle, &reader).session().await.unwrap();
    if unsynced_in_backup > 0 {
        adjust(&handle, "before-backup", &sku, -unsynced_in_backup).await;
    }
    reader.lock().unwrap().backup_to(&Ledger::path_in(restored_dir.path())).unwrap();
    if sold_after_backup > 0 {
        adjust(&handle, "after-backup", &sku, -sold_after_backup).await;
        cloud.syncer(&handle, &reader).session().await.unwrap();
    }
    let lost_actor = reader.lock().unwrap().actor().unwrap();
    drop(handle);
    writer.join();
    drop(lost_dir);

    // The backup is put in place and the store sells 5 before its first sync.
    let (handle, writer, reader) = store_ledger(restored_dir.path());
    assert_ne!(reader.lock().unwrap().actor().unwrap(), lost_actor, "a restored ledger writes as a new actor");
    adjust(&handle, "sold-5", &sku, -5).await;
    let sync = cloud.syncer(&handle, &reader);
    sync.session().await.unwrap();
    sync.session().await.unwrap();
    assert!(reader.lock().unwrap().verify().unwrap().is_ok());
    let on_hand = reader.lock().unwrap().stock(&sku).unwrap().on_hand;
    let held = cloud.cloud.chain_total(&sku).await;
    drop(sync);
    drop(handle);
    writer.join();
    (held, on_hand)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_of_a_ledger_restored_from_an_older_backup_are_counted() {
    // The cloud holds 10 more sales of the lost ledger than the backup: 50 - 10 - 5.
    assert_eq!(restore_and_sell(10, 0).await, (35, 35));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_ledger_pushes_what_the_lost_one_sold_but_never_synced() {
    // The backup holds 3 sales the cloud never got: the restored ledger pushes them as the lost
    // ledger's actor, beside its own 5: 50 - 3 - 5.
    assert_eq!(restore_and_sell(0, 3).await, (42, 42));
}
