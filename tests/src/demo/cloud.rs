//! The demo's cloud: the real `cloud-sync` router on a SQLite file, served in this process on a
//! loopback port the OS chose, with an HQ credential, and the HQ JSON API as a small client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cloud_sync::auth::Token;
use cloud_sync::http::{now_ms, router, Settings};
use cloud_sync::price_guard::Bounds;
use cloud_sync::storage::sqlite::SqliteStorage;
use cloud_sync::storage::Storage;
use serde_json::Value;
use shared::StoreId;
use tokio::sync::oneshot;

pub struct Cloud {
    pub addr: SocketAddr,
    pub db: PathBuf,
    storage: SqliteStorage,
    admin_token: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Cloud {
    /// Migrates `dir/cloud.db`, creates the HQ credential and starts serving.
    pub async fn start(dir: &Path) -> anyhow::Result<Cloud> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let db = dir.join("cloud.db");
        let storage = SqliteStorage::open(&db).with_context(|| format!("opening {}", db.display()))?;
        storage.migrate().await.context("migrating the cloud database")?;
        let admin = Token::generate();
        storage.add_admin("hq", admin.sha256(), now_ms()).await.context("creating the HQ credential")?;
        // The defaults of `cloud-sync print-default-config`.
        let settings = Settings {
            max_body_bytes: 32 << 20,
            max_skew_ms: 300_000,
            page_rows: 20_000,
            price_bounds: Bounds { decrease_pct: 60, increase_pct: 100 },
            pickup_window_minutes: 2_880,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the cloud's port")?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(storage.clone(), settings);
        let task = tokio::spawn(cloud_sync::http::serve(listener, app, async {
            let _ = stopped.await;
        }));
        Ok(Cloud {
            addr,
            db,
            storage,
            admin_token: admin.reveal().to_owned(),
            http: crate::cloud::http_client(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a store and returns its bearer token (what `cloud-sync store add` prints).
    pub async fn add_store(&self, store: &str) -> anyhow::Result<String> {
        let token = Token::generate();
        let id = StoreId::new(store)?;
        self.storage.add_store(&id, token.sha256(), now_ms()).await.with_context(|| format!("adding store {store}"))?;
        Ok(token.reveal().to_owned())
    }

    /// An HQ request: the JSON answer of a 2xx, an error naming the request otherwise.
    pub async fn hq(&self, method: &str, path: &str, body: Option<(&str, String)>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.parse()?, format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_token)
            .timeout(Duration::from_secs(10));
        if let Some((content_type, text)) = body {
            req = req.header("content-type", content_type).body(text);
        }
        let resp = req.send().await.with_context(|| format!("HQ {method} {path}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        anyhow::ensure!(status.is_success(), "HQ {method} {path}: {status}: {value}");
        Ok(value)
    }

    /// `PUT /v1/hq/prices`: a chain-wide regular price.
    pub async fn set_chain_price(&self, sku: &str, cents: i64) -> anyhow::Result<()> {
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let body =
            serde_json::json!({"sku": sku, "scope": "chain", "slot": "regular", "amount": amount, "currency": "EUR"});
        self.hq("PUT", "/v1/hq/prices", Some(("application/json", body.to_string()))).await?;
        Ok(())
    }

    /// On-hand of a SKU at a store as the cloud holds it.
    pub async fn stock(&self, sku: &str, store: &str) -> anyhow::Result<Option<i64>> {
        let answer = self.hq("GET", &format!("/v1/hq/stock/{sku}"), None).await?;
        Ok(answer["stores"]
            .as_array()
            .and_then(|stores| stores.iter().find(|s| s["store"] == store))
            .and_then(|s| s["value"].as_i64()))
    }

    /// The price in effect for a SKU at a store, as the cloud computes it, in cents.
    pub async fn price(&self, sku: &str, store: &str) -> anyhow::Result<Option<i64>> {
        let answer = self.hq("GET", &format!("/v1/hq/prices/{sku}"), None).await?;
        let amount = answer["effective"]["stores"]
            .as_array()
            .and_then(|stores| stores.iter().find(|s| s["store"] == store))
            .and_then(|s| s["price"]["amount"].as_str().map(str::to_owned));
        Ok(amount.and_then(|a| shared::Money::parse(&a, super::eur()).ok()).map(|m| m.minor))
    }

    /// `GET /v1/hq/stores`: every store's sync position as the cloud sees it.
    pub async fn stores(&self) -> anyhow::Result<Vec<Value>> {
        let answer = self.hq("GET", "/v1/hq/stores", None).await?;
        Ok(answer["stores"].as_array().cloned().unwrap_or_default())
    }

    /// Stops serving (requests in flight finish) and closes the database.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}
