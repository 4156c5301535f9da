//! The demo's day, step by step: HQ imports a catalog and prices, labels follow, lanes sell, a
//! store goes offline and keeps selling, reconnects and converges, an RFID count corrects stock,
//! a customer picks up an online order.
//! Each step waits on the real condition (polled with a deadline) and says what happened; then
//! the summary, the clean-up, and the exit code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use device_sim::rfid::RfidReader;
use edge_agent::control::protocol::Cmd;

use super::cloud::Cloud;
use super::report::{self, StoreSummary};
use super::store::{DemoStore, LANE};
use super::{money, until, Narrator};
use crate::proxy::Fault;
use crate::store::{Product, PRODUCTS};

/// Command-line options of the `demo` binary.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where the data folders go (must not exist, or be empty); default a new folder under the
    /// system's temporary directory.
    pub dir: Option<PathBuf>,
    /// Remove the data folders at the end.
    pub clean: bool,
}

/// A demo product by SKU (the weighed one, APPLES, is only shelved, never sold here).
fn product(sku: &str) -> &'static Product {
    PRODUCTS.iter().find(|p| p.sku == sku).expect("a demo product")
}

fn catalog_csv() -> String {
    let mut csv = String::from("sku,name,gtins,unit,tax_class,discontinued\n");
    for p in PRODUCTS {
        let unit = if p.unit == shared::Unit::Gram { "gram" } else { "piece" };
        csv.push_str(&format!("{},{},{},{unit},food,false\n", p.sku, p.name, p.gtin));
    }
    csv
}

/// Everything the demo started, so it can be stopped whatever happens.
struct World {
    cloud: Cloud,
    stores: Vec<DemoStore>,
    /// The RFID reader's MQTT connection.
    rfid: Option<RfidReader>,
}

/// Runs the demo; returns the process exit code (0: every replica agrees and every label shows
/// its price).
pub async fn run(options: Options) -> i32 {
    let say = Narrator::new();
    let root = match prepare_dir(options.dir.as_deref()) {
        Ok(root) => root,
        Err(e) => {
            eprintln!("demo: {e:#}");
            return 64;
        }
    };
    say.say(format!("store-edge demo: one cloud, two stores, a day of trading. Data folders: {}", root.display()));
    let mut world = match start(&root, &say).await {
        Ok(world) => world,
        Err(e) => {
            say.say(format!("FAILED to start: {e:#}"));
            return 1;
        }
    };
    // Ctrl-C ends the day early; the clean-up below still runs (the daemons, which hear the
    // signal too, shut down by themselves; a second Ctrl-C exits at once).
    let mut interrupted = false;
    let played = tokio::select! {
        played = tokio::time::timeout(PLAY_LIMIT, play(&mut world, &say)) => match played {
            Ok(played) => played,
            Err(_) => Err(anyhow::anyhow!("the day took longer than {} s", PLAY_LIMIT.as_secs())),
        },
        _ = tokio::signal::ctrl_c() => {
            interrupted = true;
            Err(anyhow::anyhow!("interrupted (Ctrl-C)"))
        }
    };
    if let Err(e) = &played {
        say.say(format!("FAILED: {e:#}"));
    }
    let summaries = summarize(&world).await;

    say.say("Stopping: both stores' daemons (clean shutdown), labels, lanes, RFID reader, links, cloud");
    let mut problems = Vec::new();
    drop(world.rfid.take());
    for store in &mut world.stores {
        problems.extend(store.stop().await);
    }
    world.cloud.stop().await;
    if problems.is_empty() {
        say.say("Both daemons stopped cleanly and both ledgers verify (hash chain intact)");
    }

    println!();
    println!("SUMMARY (stock columns: on hand in the store / in the cloud)");
    match &summaries {
        Ok(summaries) => {
            for line in report::table(summaries) {
                println!("  {line}");
            }
            problems.extend(summaries.iter().flat_map(StoreSummary::problems));
        }
        Err(e) => problems.push(format!("could not read the final state: {e:#}")),
    }
    if let Err(e) = played {
        problems.insert(0, format!("the day did not play out: {e:#}"));
    }
    println!();
    if options.clean {
        match std::fs::remove_dir_all(&root) {
            Ok(()) => println!("Data folders removed (--clean): {}", root.display()),
            Err(e) => println!("Could not remove {}: {e}", root.display()),
        }
    } else {
        print_paths(&root, &world);
    }
    println!();
    println!("Took {:.1} s.", say.elapsed().as_secs_f64());
    if interrupted {
        println!("RESULT: interrupted");
        130
    } else if problems.is_empty() {
        println!("RESULT: every replica agrees and every shelf label shows its price.");
        0
    } else {
        println!("RESULT: FAILED");
        for p in &problems {
            println!("  - {p}");
        }
        1
    }
}

fn prepare_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(dir) => {
            let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true);
            anyhow::ensure!(empty, "--dir {} is not empty: choose a new folder (or remove it)", dir.display());
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok(dir.canonicalize()?)
        }
        None => Ok(tempfile::Builder::new().prefix("store-edge-demo-").tempdir()?.keep()),
    }
}

fn print_paths(root: &Path, world: &World) {
    println!("Data folders (kept): {}", root.display());
    println!("  cloud  {}", world.cloud.db.display());
    for s in &world.stores {
        println!("  {:<6} {}   (config {})", s.id, s.files.data.display(), s.files.config.display());
    }
    println!("Look at them with storectl (the daemons have stopped, so it reads the ledger read-only):");
    for (store, args) in [(0, "status"), (0, "stock show MILK"), (1, "stock show EGGS"), (1, "ledger verify")] {
        if let Some(s) = world.stores.get(store) {
            println!(
                "  cargo run --release -p edge-agent --bin storectl -- --data-dir {} {args}",
                s.files.data.display()
            );
        }
    }
}

async fn start(root: &Path, say: &Narrator) -> anyhow::Result<World> {
    let cloud = Cloud::start(&root.join("cloud")).await?;
    say.say(format!("The cloud (cloud-sync on SQLite) listens on {}", cloud.url()));
    let mut stores = Vec::new();
    for id in ["s1", "s2"] {
        let store = DemoStore::start(root, id, &cloud, PRODUCTS, "").await?;
        say.say(format!(
            "Store {id} is up: edge-agent with its own MQTT broker, a SQLite ledger with opening stock, \
             {LANE} (scanner, scale, display), {} shelf labels; it reaches the cloud through a link the demo can cut",
            store.labels.len()
        ));
        stores.push(store);
    }
    Ok(World { cloud, stores, rfid: None })
}

/// Every store's stock of every product agrees with the cloud's.
async fn stock_agrees(world: &World) -> bool {
    for store in &world.stores {
        for p in PRODUCTS {
            let Ok(local) = store.on_hand(p.sku) else { return false };
            match world.cloud.stock(p.sku, &store.id).await {
                Ok(Some(cloud)) if cloud == local => {}
                _ => return false,
            }
        }
    }
    true
}

async fn play(world: &mut World, say: &Narrator) -> anyhow::Result<()> {
    // 1. HQ: catalog and prices; the stores and their labels follow.
    world.cloud.hq("POST", "/v1/hq/catalog", Some(("text/csv", catalog_csv()))).await?;
    for p in PRODUCTS {
        world.cloud.set_chain_price(p.sku, p.price_cents).await?;
    }
    let list: Vec<String> = PRODUCTS
        .iter()
        .map(|p| {
            format!("{} {}{}", p.name, money(p.price_cents), if p.unit == shared::Unit::Gram { "/kg" } else { "" })
        })
        .collect();
    say.say(format!("HQ imports {} products and sets their prices: {}", PRODUCTS.len(), list.join(", ")));
    let stores = &world.stores;
    let took = until("both stores have HQ's catalog and prices", || async move {
        stores.iter().all(|s| PRODUCTS.iter().all(|p| s.price(p.sku) == Some(p.price_cents)))
    })
    .await?;
    say.say(format!("Both stores received the catalog and prices by sync ({:.1} s)", took.as_secs_f64()));
    let took = until("every shelf label shows its price", || async move {
        stores.iter().all(|s| s.labels_current().0 == s.labels.len())
    })
    .await?;
    let labels: usize = stores.iter().map(|s| s.labels.len()).sum();
    say.say(format!("All {labels} shelf labels in both stores show their prices ({:.1} s)", took.as_secs_f64()));

    // 2. The lanes sell.
    let (milk, bread, eggs) = (product("MILK"), product("BREAD"), product("EGGS"));
    for (i, basket) in [vec![milk, bread], vec![eggs, milk]].into_iter().enumerate() {
        let store = &mut world.stores[i];
        let sale = store.sell(&basket).await?;
        say.say(format!(
            "{} {LANE} sells {}: {} paid by card (receipt {})",
            store.id,
            sale.items.join(" + "),
            money(sale.total_minor),
            sale.receipt
        ));
    }
    let w = &*world;
    let took = until("the cloud has both stores' sales", || stock_agrees(w)).await?;
    say.say(format!("The cloud has both stores' sales ({:.1} s)", took.as_secs_f64()));

    // 3. HQ changes prices: an increase and a decrease.
    world.cloud.set_chain_price("MILK", 129).await?;
    world.cloud.set_chain_price("BREAD", 229).await?;
    say.say(format!(
        "HQ raises {} to {} and lowers {} to {} (a lane charges an increase only once the labels show it)",
        milk.name,
        money(129),
        bread.name,
        money(229)
    ));
    let stores = &world.stores;
    let took = until("both stores' labels show the new prices", || async move {
        stores.iter().all(|s| {
            s.price("MILK") == Some(129)
                && s.price("BREAD") == Some(229)
                && s.labels_showing("MILK", 129).0 == s.labels_showing("MILK", 129).1
                && s.labels_showing("BREAD", 229).0 == s.labels_showing("BREAD", 229).1
        })
    })
    .await?;
    say.say(format!(
        "Labels in both stores now show {} {} and {} {} ({:.1} s)",
        milk.name,
        money(129),
        bread.name,
        money(229),
        took.as_secs_f64()
    ));

    // 4. s1 goes offline and keeps selling; HQ changes a price meanwhile.
    let s1 = &world.stores[0];
    let faulted = s1.proxy.counts().faulted;
    s1.proxy.set(Fault::Down);
    say.say("Store s1 goes offline (its link to the cloud is cut)");
    until("s1 notices it cannot reach the cloud", || async move {
        s1.proxy.counts().faulted > faulted
            && s1.control(Cmd::SyncStatus).await.is_ok_and(|v| v["status"]["consecutive_failures"].as_u64() > Some(0))
    })
    .await?;
    let status = s1.control(Cmd::SyncStatus).await?;
    let error = status["status"]["last_error"].as_str().unwrap_or("failing");
    // "cloud unreachable: error sending request ...": the first words say it.
    say.detail(format!("s1's sync status says: {}", error.split(": ").next().unwrap_or(error)));
    world.cloud.set_chain_price("EGGS", 349).await?;
    say.say(format!("HQ raises {} to {}", eggs.name, money(349)));
    let s2 = &world.stores[1];
    let took = until("s2's egg labels show the new price", || async move {
        s2.price("EGGS") == Some(349) && s2.labels_showing("EGGS", 349).0 == s2.labels_showing("EGGS", 349).1
    })
    .await?;
    let s1 = &world.stores[0];
    say.say(format!(
        "s2 gets it and its {} egg labels show {} ({:.1} s); offline s1 cannot know: its egg labels show {}",
        s2.labels_showing("EGGS", 349).1,
        money(349),
        took.as_secs_f64(),
        s1.price("EGGS").map_or("nothing".into(), money)
    ));
    let sale = world.stores[0].sell(&[milk, milk]).await?;
    let s1 = &world.stores[0];
    let cloud_view = world.cloud.stock("MILK", "s1").await?;
    say.say(format!(
        "s1 sells 2 x {} while offline: {} (receipt {}). s1 has {} left; the cloud still thinks {}; {} changed row(s) wait in s1's outbox",
        milk.name,
        money(sale.total_minor),
        sale.receipt,
        s1.on_hand("MILK")?,
        cloud_view.map_or("nothing".into(), |v| v.to_string()),
        s1.outbox()
    ));

    // 5. s1 reconnects and converges.
    s1.proxy.set(Fault::None);
    s1.control(Cmd::SyncNow).await?;
    say.say("s1's link is back; the demo asks it to sync now (storectl sync now)");
    let cloud = &world.cloud;
    let took = until("s1 converges with the cloud", || async move {
        let local = s1.on_hand("MILK").ok();
        s1.outbox() == 0
            && cloud.stock("MILK", "s1").await.ok().flatten() == local
            && s1.price("EGGS") == Some(349)
            && s1.labels_showing("EGGS", 349).0 == s1.labels_showing("EGGS", 349).1
    })
    .await?;
    say.say(format!(
        "s1 converged in {:.1} s: the cloud has its offline sales ({} Milk at s1), its egg labels show {}",
        took.as_secs_f64(),
        s1.on_hand("MILK")?,
        money(349)
    ));

    // 6. An RFID inventory cycle at s2 corrects its stock of eggs.
    let s2 = &world.stores[1];
    let expected = s2.on_hand("EGGS")?;
    let present = expected - 3; // three packs went missing from the shelf
    let epcs: Vec<Vec<u8>> = (1..=present as u64)
        .map(|serial| device_sim::rfid::sgtin96(eggs.gtin, 7, serial).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let mut reader = RfidReader::connect("127.0.0.1", s2.broker_port, &s2.id, super::store::COUNT_READER);
    const REPEAT: usize = 3;
    reader.count_cycle(1, &epcs, 1, REPEAT).await.map_err(anyhow::Error::msg)?;
    world.rfid = Some(reader);
    say.say(format!(
        "s2's RFID reader in the back room runs an inventory cycle over the {} shelf: {present} tagged packs, \
         each read {REPEAT} times",
        eggs.name
    ));
    let s2 = &world.stores[1];
    let took = until("s2's hub records the zone count and the cloud has it", || async move {
        s2.on_hand("EGGS").ok() == Some(present) && cloud.stock("EGGS", "s2").await.ok().flatten() == Some(present)
    })
    .await?;
    say.say(format!(
        "s2's hub counted {present} distinct packs in the cycle and recorded a stock count: {} corrected from \
         {expected} to {present}, and the cloud has it ({:.1} s)",
        eggs.name,
        took.as_secs_f64()
    ));

    // 7. An online pickup order: HQ reserves it against the bread s2 granted the online channel;
    // s2's counter hands it over with the customer's code.
    let bread_rights = || async move {
        let Ok(allocation) = cloud.hq("GET", "/v1/hq/stores/s2/allocation", None).await else { return None };
        allocation["skus"].as_array()?.iter().find(|a| a["sku"] == "BREAD")?["rights"].as_u64()
    };
    until("the cloud holds the bread s2 granted online", || async move { bread_rights().await >= Some(2) }).await?;
    let granted = bread_rights().await.unwrap_or(0);
    let order = serde_json::json!({"order": "WEB-1001", "store": "s2", "customer_ref": "web customer 42",
                                   "lines": [{"sku": "BREAD", "units": 2}]});
    let created = world.cloud.hq("POST", "/v1/hq/orders", Some(("application/json", order.to_string()))).await?;
    let code = created["pickup_code"].as_str().context("the order has no pickup code")?.to_owned();
    say.say(format!(
        "A customer orders 2 x {} online for pickup at s2: HQ reserves them against the {granted} units s2 \
         keeps granted to the online channel (pickup code {code})",
        bread.name
    ));
    let s2 = &world.stores[1];
    let took = until("s2 has the order", || async move {
        s2.control(Cmd::OrdersShow { order: "WEB-1001".into() }).await.is_ok_and(|o| o["status"] == "reserved")
    })
    .await?;
    say.detail(format!("s2 received the order with its next sync ({:.1} s)", took.as_secs_f64()));
    let before = s2.on_hand("BREAD")?;
    s2.control(Cmd::OrdersPick { key: "demo:pick:WEB-1001".into(), order: "WEB-1001".into() }).await?;
    s2.control(Cmd::OrdersHandover { key: "demo:handover:WEB-1001".into(), order: "WEB-1001".into(), code })
        .await?;
    let took = until("the cloud sees the order fulfilled", || async move {
        cloud.hq("GET", "/v1/hq/orders/WEB-1001", None).await.is_ok_and(|o| o["status"] == "fulfilled")
    })
    .await?;
    say.say(format!(
        "At s2's counter staff pick the order and the customer gives the code: handed over ({} {} -> {}), \
         and the cloud sees it fulfilled ({:.1} s)",
        bread.name,
        before,
        s2.on_hand("BREAD")?,
        took.as_secs_f64()
    ));

    // 8. Everyone agrees.
    let w = &*world;
    let took = until("every replica agrees and both stores are caught up", || async move {
        if !stock_agrees(w).await {
            return false;
        }
        let Ok(status) = w.cloud.stores().await else { return false };
        w.stores.iter().all(|s| {
            s.outbox() == 0
                && s.labels_current().0 == s.labels.len()
                && status.iter().any(|v| {
                    v["store"] == s.id.as_str()
                        && v["push_lag_versions"].as_u64() == Some(0)
                        && v["pending_rows"].as_u64() == Some(0)
                })
        })
    })
    .await?;
    say.say(format!("Stores and cloud agree; both stores are caught up ({:.1} s)", took.as_secs_f64()));
    Ok(())
}

async fn summarize(world: &World) -> anyhow::Result<Vec<StoreSummary>> {
    let status = world.cloud.stores().await?;
    let mut out = Vec::new();
    for s in &world.stores {
        let mut stock = Vec::new();
        let mut price_differences = Vec::new();
        for p in PRODUCTS {
            stock.push((p.sku.to_owned(), s.on_hand(p.sku)?, world.cloud.stock(p.sku, &s.id).await?));
            if s.price(p.sku) != world.cloud.price(p.sku, &s.id).await? {
                price_differences.push(p.sku.to_owned());
            }
        }
        let (labels_current, labels) = s.labels_current();
        let view = status.iter().find(|v| v["store"] == s.id.as_str());
        out.push(StoreSummary {
            store: s.id.clone(),
            sales: s.sales.len(),
            takings_minor: s.sales.iter().map(|sale| sale.total_minor).sum(),
            stock,
            price_differences,
            labels_current,
            labels,
            outbox_rows: s.outbox(),
            push_lag_versions: view.and_then(|v| v["push_lag_versions"].as_u64()),
            pending_rows: view.and_then(|v| v["pending_rows"].as_u64()),
            seconds_since_seen: view.and_then(|v| v["seconds_since_seen"].as_u64()),
        });
    }
    Ok(out)
}

/// How long the day may take before the demo gives up on it and reports (the issue asks for
/// about a minute in all).
pub const PLAY_LIMIT: Duration = Duration::from_secs(90);
