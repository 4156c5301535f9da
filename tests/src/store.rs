//! A store on this machine for a test: a data folder seeded with products, a config naming its
//! lanes and their serial devices (pty symlinks in a by-id folder), and the real `edge-agent`
//! binary started against it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edge_agent::ledger::{Command as LedgerCommand, IdempotencyKey, Ledger, LedgerOptions, LedgerReader};
use shared::{CatalogField, Currency, Gtin, Money, PriceKey, PriceScope, PriceSlot, PriceValue, Sku, StoreId, Unit};

use crate::{signal, workspace_bin, Running, SIGTERM};

pub const STORE: &str = "s1";

pub struct Product {
    pub sku: &'static str,
    pub name: &'static str,
    pub gtin: &'static str,
    pub unit: Unit,
    /// Per piece, or per kilogram.
    pub price_cents: i64,
    pub stock: i64,
}

/// The products every lane test shops from.
pub const PRODUCTS: &[Product] = &[
    Product { sku: "MILK", name: "Milk 1 l", gtin: "4006381333931", unit: Unit::Piece, price_cents: 119, stock: 100 },
    Product { sku: "BREAD", name: "Bread", gtin: "96385074", unit: Unit::Piece, price_cents: 250, stock: 100 },
    Product { sku: "EGGS", name: "Eggs x6", gtin: "036000291452", unit: Unit::Piece, price_cents: 329, stock: 100 },
    Product {
        sku: "APPLES",
        name: "Apples",
        gtin: "10614141000415",
        unit: Unit::Gram,
        price_cents: 299,
        stock: 50_000,
    },
];

/// What a fixture's ledger starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// Catalog, chain prices and opening stock of [`PRODUCTS`], written locally (a store
    /// running alone).
    Products,
    /// Only the opening stock of [`PRODUCTS`]: catalog and prices come from the cloud.
    StockOnly,
}

pub struct StoreFixture {
    pub store: String,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub by_id: PathBuf,
    pub config: PathBuf,
    pub lanes: Vec<String>,
}

impl StoreFixture {
    /// A store with these lanes, each with a plain scanner, a framed scale and a framed lane
    /// display at `by_id/{lane}-scanner|scale|display`; seeded with [`PRODUCTS`].
    pub fn new(lanes: &[&str]) -> StoreFixture {
        StoreFixture::with_config(lanes, "")
    }

    /// Like [`StoreFixture::new`], with more configuration appended (e.g. `[mqtt]`, `[rfid]`).
    pub fn with_config(lanes: &[&str], extra: &str) -> StoreFixture {
        StoreFixture::with_lane_config(lanes, "", extra)
    }

    /// Like [`StoreFixture::with_config`], with `lane_extra` added to every `[[lanes]]` table.
    pub fn with_lane_config(lanes: &[&str], lane_extra: &str, extra: &str) -> StoreFixture {
        StoreFixture::custom(STORE, lanes, lane_extra, extra, Seed::Products)
    }

    /// A store with its own id, lanes as in [`StoreFixture::new`], and the seed given.
    pub fn custom(store: &str, lanes: &[&str], lane_extra: &str, extra: &str, seed_with: Seed) -> StoreFixture {
        let dir = tempfile::tempdir().unwrap();
        let files = StoreFiles::create(dir.path(), store, lanes, lane_extra, extra, seed_with);
        StoreFixture {
            store: store.to_owned(),
            data: files.data,
            by_id: files.by_id,
            config: files.config,
            lanes: lanes.iter().map(|s| s.to_string()).collect(),
            dir,
        }
    }

    pub fn device_path(&self, lane: &str, device: &str) -> PathBuf {
        self.by_id.join(format!("{lane}-{device}"))
    }

    pub fn start(&self) -> Daemon {
        let mut cmd = Command::new(workspace_bin("edge-agent"));
        cmd.arg("run").arg("--config").arg(&self.config);
        let run = Running::spawn(cmd, true);
        run.wait_for("edge-agent ready", Duration::from_secs(30));
        Daemon { run }
    }

    pub fn reader(&self) -> LedgerReader {
        LedgerReader::open(&self.data).unwrap()
    }

    pub fn on_hand(&self, sku: &str) -> i64 {
        self.reader().stock(&Sku::new(sku).unwrap()).unwrap().on_hand
    }

    pub fn storectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(workspace_bin("storectl")).arg("--data-dir").arg(&self.data).args(args).output().unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A store's files in a folder the caller owns (a fixture's temporary one, or the demo's):
/// `data/` seeded as asked, `by-id/` for the devices' pty links, and `config.toml`.
pub struct StoreFiles {
    pub data: PathBuf,
    pub by_id: PathBuf,
    pub config: PathBuf,
}

impl StoreFiles {
    /// Writes the config (lanes as in [`StoreFixture::new`], then `extra`) and seeds the ledger.
    pub fn create(
        dir: &Path,
        store: &str,
        lanes: &[&str],
        lane_extra: &str,
        extra: &str,
        seed_with: Seed,
    ) -> StoreFiles {
        let data = dir.join("data");
        let by_id = dir.join("by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        let mut config = format!(
            "[store]\nid = \"{store}\"\ncurrency = \"EUR\"\n[ledger]\ndata_dir = \"{}\"\nshutdown_timeout_ms = 5000\n[log]\nlevel = \"info,edge_agent=debug\"\n",
            data.display()
        );
        // A lane config that sets its own double-read window keeps it.
        let window = if lane_extra.contains("double_read_window_ms") { "" } else { "double_read_window_ms = 500\n" };
        for lane in lanes {
            config.push_str(&format!("[[lanes]]\nid = \"{lane}\"\n{window}{lane_extra}"));
            for (kind, mode) in [("scanner", "plain"), ("scale", "framed"), ("lane", "framed")] {
                let name = if kind == "lane" { "display" } else { kind };
                config.push_str(&format!(
                    "[[serial]]\nid = \"{lane}-{name}\"\nkind = \"{kind}\"\nlane = \"{lane}\"\npath = \"{}\"\nmode = \"{mode}\"\nsuffix = \"cr\"\n",
                    by_id.join(format!("{lane}-{name}")).display()
                ));
            }
        }
        config.push_str(extra);
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let (seed_data, id) = (data.clone(), store.to_owned());
        // Through the real ledger writer, on a plain thread (tests may build fixtures inside a
        // tokio runtime, where blocking is not allowed).
        std::thread::spawn(move || seed(&seed_data, &id, seed_with)).join().expect("seeding the ledger");
        StoreFiles { data, by_id, config: config_path }
    }
}

fn seed(data: &Path, store: &str, seed: Seed) {
    let eur = Currency::new("EUR").unwrap();
    let (h, w) =
        Ledger::open(data, &LedgerOptions::new(StoreId::new(store).unwrap(), eur)).unwrap().start_writer(64).unwrap();
    for p in PRODUCTS {
        let sku = Sku::new(p.sku).unwrap();
        let key = |what: &str| IdempotencyKey::new(format!("seed:{}:{what}", p.sku)).unwrap();
        if seed == Seed::StockOnly {
            let receipt = LedgerCommand::Receipt { sku, quantity: p.stock, reference: "opening".into() };
            h.blocking_submit(key("stock"), receipt).unwrap();
            continue;
        }
        let fields = [
            CatalogField::Name(p.name.into()),
            CatalogField::Gtins(vec![Gtin::parse(p.gtin).unwrap()]),
            CatalogField::Unit(p.unit),
        ];
        for field in fields {
            let what = field.name();
            h.blocking_submit(key(what), LedgerCommand::CatalogChange { sku: sku.clone(), field }).unwrap();
        }
        let price = LedgerCommand::PriceChange {
            key: PriceKey { sku: sku.clone(), scope: PriceScope::Chain, slot: PriceSlot::Regular },
            value: Some(PriceValue { amount: Money::new(p.price_cents, eur), window: None }),
        };
        h.blocking_submit(key("price"), price).unwrap();
        h.blocking_submit(key("stock"), LedgerCommand::Receipt { sku, quantity: p.stock, reference: "opening".into() })
            .unwrap();
    }
    drop(h);
    w.join();
}

pub struct Daemon {
    pub run: Running,
}

impl Daemon {
    /// SIGTERM, and a clean exit within 10 s.
    pub fn stop(mut self) {
        signal(&self.run.child, SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.run.child.try_wait().unwrap() {
                assert!(status.success(), "edge-agent exited with {status}");
                return;
            }
            assert!(std::time::Instant::now() < deadline, "edge-agent did not stop within 10 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the power cut.
    pub fn kill(mut self) {
        self.run.child.kill().unwrap();
        self.run.child.wait().unwrap();
    }

    /// Log lines printed so far.
    pub fn log(&self) -> Vec<String> {
        self.run.lines.try_iter().collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.run.child.kill();
        let _ = self.run.child.wait();
    }
}
