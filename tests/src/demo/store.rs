//! A store of the demo: the real `edge-agent` daemon run in this process (`daemon::run_until`)
//! on its own data folder, with its embedded MQTT broker, a fleet of simulated shelf labels, a
//! self-checkout lane whose scanner, scale and display are ptys, and a fault proxy on its link
//! to the cloud so the demo can take it offline.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use device_sim::esl::EslFleet;
use device_sim::{FramedSim, PlainScannerSim, Port, Suffix};
use edge_agent::config::Config;
use edge_agent::control::protocol::Cmd;
use edge_agent::ledger::LedgerReader;
use firmware_proto as fp;
use serde_json::Value;
use shared::{Sku, StoreId};
use tokio::sync::{mpsc, oneshot};

use super::cloud::Cloud;
use crate::mqtt::free_port;
use crate::proxy::FaultProxy;
use crate::store::{Product, Seed, StoreFiles};

pub const LANE: &str = "lane-1";
/// The back-room RFID reader whose antenna 1 is a counting zone in each store.
pub const COUNT_READER: &str = "backroom-1";
/// Shelf labels per product in each store.
pub const LABELS_PER_PRODUCT: usize = 3;

/// A committed sale, as the lane's display showed it.
#[derive(Debug, Clone)]
pub struct Sale {
    pub receipt: String,
    pub total_minor: i64,
    pub items: Vec<&'static str>,
}

type SaleReply = oneshot::Sender<anyhow::Result<Sale>>;
type LaneRequests = mpsc::Sender<(Vec<&'static Product>, SaleReply)>;

pub struct DemoStore {
    pub id: String,
    pub dir: PathBuf,
    pub files: StoreFiles,
    pub control: PathBuf,
    pub broker_port: u16,
    pub proxy: FaultProxy,
    pub fleet: EslFleet,
    /// (label, SKU) as bound in `labels.csv`.
    pub labels: Vec<(String, &'static str)>,
    pub sales: Vec<Sale>,
    reader: LedgerReader,
    lane: LaneRequests,
    lane_task: tokio::task::JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
    daemon: Option<tokio::task::JoinHandle<Result<(), edge_agent::daemon::DaemonError>>>,
}

impl DemoStore {
    /// Writes the store's config, seeds its opening stock, plugs its lane devices in, starts its
    /// daemon and waits until it answers on its control socket and its lane devices are greeted.
    pub async fn start(
        root: &Path,
        id: &str,
        cloud: &Cloud,
        products: &'static [Product],
        lane_extra: &str,
    ) -> anyhow::Result<DemoStore> {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let proxy = FaultProxy::start(cloud.addr).await;
        let token_file = dir.join("cloud.token");
        std::fs::write(&token_file, format!("{}\n", cloud.add_store(id).await?))?;
        let labels: Vec<(String, &'static str)> = products
            .iter()
            .flat_map(|p| (1..=LABELS_PER_PRODUCT).map(move |i| (format!("{}-{i}", p.sku.to_lowercase()), p.sku)))
            .collect();
        let bindings = dir.join("labels.csv");
        let csv: String = labels.iter().map(|(l, sku)| format!("{l},{sku}\n")).collect();
        std::fs::write(&bindings, format!("label,sku\n{csv}"))?;
        let broker_port = free_port();
        let extra = format!(
            "[mqtt]\nembedded_listen = \"127.0.0.1:{broker_port}\"\n\
             [labels]\nbindings = \"{}\"\nincrease_deadline_ms = 10000\n\
             [[rfid.count_zone]]\nreader = \"{COUNT_READER}\"\nantennas = [1]\n\
             [online]\nenabled = true\n[[online.rule]]\nsku = \"BREAD\"\ntarget = 5\nsafety_stock = 2\n\
             [cloud]\nurl = \"{}\"\ntoken_file = \"{}\"\ninterval_ms = 300\ntimeout_ms = 3000\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n",
            bindings.display(),
            proxy.url(),
            token_file.display()
        );
        let (store_dir, store_id, lane_extra) = (dir.clone(), id.to_owned(), lane_extra.to_owned());
        let files = tokio::task::spawn_blocking(move || {
            StoreFiles::create(&store_dir, &store_id, &[LANE], &lane_extra, &extra, Seed::StockOnly)
        })
        .await
        .context("writing the store's config and opening stock")?;
        let config = Config::load(&files.config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let control = config.control_socket();

        // The lane's devices are plugged in before the daemon starts, so it finds them at once.
        let scanner = PlainScannerSim::new(Port::pty(&files.by_id.join(format!("{LANE}-scanner")))?, Suffix::Cr, None);
        let scale = FramedSim::new(
            Port::pty(&files.by_id.join(format!("{LANE}-scale")))?,
            &format!("{LANE}-scale"),
            fp::DeviceKind::Scale,
        );
        let display = FramedSim::new(
            Port::pty(&files.by_id.join(format!("{LANE}-display")))?,
            &format!("{LANE}-display"),
            fp::DeviceKind::Lane,
        );

        // Dropping `stop` (an error below) stops the daemon as well as sending on it does.
        let (stop, stopped) = oneshot::channel::<()>();
        let daemon = tokio::spawn(edge_agent::daemon::run_until(config, files.config.clone(), async {
            let _ = stopped.await;
        }));
        let answered = super::until(&format!("{id}'s daemon answers on its control socket"), || {
            let (daemon, control) = (&daemon, &control);
            async move { daemon.is_finished() || control_call(control, Cmd::Status).await.is_ok() }
        })
        .await;
        if daemon.is_finished() {
            anyhow::bail!("{id}'s daemon stopped at start: {:?}", daemon.await);
        }
        answered?;
        let (lane, lane_task, ready) = lane_task(scanner, scale, display);
        ready.await.context("the lane task ended")??;
        let label_ids: Vec<String> = labels.iter().map(|l| l.0.clone()).collect();
        Ok(DemoStore {
            id: id.to_owned(),
            dir,
            reader: LedgerReader::open(&files.data)?,
            files,
            control,
            broker_port,
            proxy,
            fleet: EslFleet::start("127.0.0.1", broker_port, id, &label_ids, HashSet::new()),
            labels,
            sales: Vec::new(),
            lane,
            lane_task,
            stop: Some(stop),
            daemon: Some(daemon),
        })
    }

    /// A request on the daemon's control socket, as `storectl` sends it.
    pub async fn control(&self, cmd: Cmd) -> anyhow::Result<Value> {
        control_call(&self.control, cmd).await
    }

    /// Sells these items in one basket at the lane: scan each, pay by card, wait for the receipt.
    pub async fn sell(&mut self, items: &[&'static Product]) -> anyhow::Result<Sale> {
        let (reply, answer) = oneshot::channel();
        self.lane.send((items.to_vec(), reply)).await.map_err(|_| anyhow::anyhow!("{}'s lane task ended", self.id))?;
        let sale = answer.await.map_err(|_| anyhow::anyhow!("{}'s lane task ended", self.id))??;
        self.sales.push(sale.clone());
        Ok(sale)
    }

    /// On-hand of a SKU in the store's ledger.
    pub fn on_hand(&self, sku: &str) -> anyhow::Result<i64> {
        Ok(self.reader.stock(&Sku::new(sku)?)?.on_hand)
    }

    /// The price in effect for a SKU in the store's ledger now, in cents.
    pub fn price(&self, sku: &str) -> Option<i64> {
        let sku = Sku::new(sku).ok()?;
        let entries = self.reader.prices(&sku).ok()?;
        let store = StoreId::new(&self.id).ok()?;
        let now = edge_agent::labels::runtime::wall_ms();
        shared::effective_price(&entries, &sku, &store, now)?.value.as_ref().map(|v| v.amount.minor)
    }

    /// Rows waiting to be pushed to the cloud.
    pub fn outbox(&self) -> u64 {
        self.reader.outbox_depth().unwrap_or(u64::MAX)
    }

    /// Labels bound to `sku` that show `cents`, and how many are bound to it.
    pub fn labels_showing(&self, sku: &str, cents: i64) -> (usize, usize) {
        let shown = self.fleet.snapshot();
        let bound: Vec<_> = self.labels.iter().filter(|(_, s)| *s == sku).collect();
        let ok = bound.iter().filter(|(l, _)| shown.get(l).and_then(|s| s.last_price_minor) == Some(cents)).count();
        (ok, bound.len())
    }

    /// Labels that show the price now in effect in the store's ledger, and the number of labels.
    pub fn labels_current(&self) -> (usize, usize) {
        let shown = self.fleet.snapshot();
        let ok = self
            .labels
            .iter()
            .filter(|(l, sku)| {
                let price = self.price(sku);
                price.is_some() && shown.get(l).and_then(|s| s.last_price_minor) == price
            })
            .count();
        (ok, self.labels.len())
    }

    /// Stops the lane devices, the labels and the daemon (a clean shutdown through `run_until`),
    /// then checks the ledger's hash chain. Returns what went wrong, if anything.
    pub async fn stop(&mut self) -> Option<String> {
        let mut problem = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(daemon) = self.daemon.take() {
            match tokio::time::timeout(Duration::from_secs(15), daemon).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => problem = Some(format!("{}'s daemon stopped with an error: {e}", self.id)),
                Ok(Err(e)) => problem = Some(format!("{}'s daemon task failed: {e}", self.id)),
                Err(_) => problem = Some(format!("{}'s daemon did not stop within 15 s", self.id)),
            }
        }
        self.lane_task.abort();
        let _ = self.fleet.client.disconnect().await;
        if problem.is_none() {
            match self.reader.verify() {
                Ok(Ok(_)) => {}
                Ok(Err(brk)) => problem = Some(format!("{}'s ledger failed verification: {brk:?}", self.id)),
                Err(e) => problem = Some(format!("{}'s ledger could not be verified: {e}", self.id)),
            }
        }
        problem
    }
}

async fn control_call(socket: &Path, cmd: Cmd) -> anyhow::Result<Value> {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || edge_agent::control::client::call(&socket, cmd, Duration::from_secs(5)))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The task owning the lane's devices: it greets the hub, sells what it is asked to, and in
/// between reads (and acks) what the hub sends the display and the scale.
fn lane_task(
    mut scanner: PlainScannerSim,
    mut scale: FramedSim,
    mut display: FramedSim,
) -> (LaneRequests, tokio::task::JoinHandle<()>, oneshot::Receiver<anyhow::Result<()>>) {
    let (tx, mut rx) = mpsc::channel::<(Vec<&'static Product>, SaleReply)>(4);
    let (ready_tx, ready) = oneshot::channel();
    let task = tokio::spawn(async move {
        let greeted = async {
            for sim in [&mut scale, &mut display] {
                match sim.hello(super::STEP_WAIT).await {
                    Ok(fp::Body::HelloAck(_)) => {}
                    other => anyhow::bail!("the hub did not greet {}: {other:?}", sim.name),
                }
            }
            Ok(())
        }
        .await;
        let failed = greeted.is_err();
        let _ = ready_tx.send(greeted);
        if failed {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                Ok(Some((items, reply))) => {
                    let _ = reply.send(sell(&mut scanner, &mut display, &items).await);
                }
                Ok(None) => return,
                Err(_) => {
                    let _ = display.pump(Duration::from_millis(10)).await;
                    let _ = scale.pump(Duration::from_millis(10)).await;
                    display.inbox.clear();
                    scale.inbox.clear();
                }
            }
        }
    });
    (tx, task, ready)
}

async fn sell(
    scanner: &mut PlainScannerSim,
    display: &mut FramedSim,
    items: &[&'static Product],
) -> anyhow::Result<Sale> {
    let wait = super::STEP_WAIT;
    let mut total = 0;
    let mut last: Option<&str> = None;
    for item in items {
        if last == Some(item.gtin) {
            // A customer does not scan the same item twice within the lane's double-read window
            // (which would rightly count once).
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        last = Some(item.gtin);
        scanner.scan(item.gtin).await?;
        let seen = display
            .wait_display(wait, |d| matches!(d, fp::LaneDisplay::Total { amount_minor, .. } if *amount_minor > total))
            .await
            .with_context(|| format!("the lane did not add {}", item.name))?;
        if let Some(fp::LaneDisplay::Total { amount_minor, .. }) = seen.last() {
            total = *amount_minor;
        }
    }
    display.input(fp::LaneInput::Tender(fp::TenderKind::Card)).await?;
    let seen = display
        .wait_display(wait, |d| matches!(d, fp::LaneDisplay::Receipt { .. }))
        .await
        .context("the lane did not print a receipt")?;
    match seen.last() {
        Some(fp::LaneDisplay::Receipt { receipt_id, total_minor }) => Ok(Sale {
            receipt: receipt_id.to_string(),
            total_minor: *total_minor,
            items: items.iter().map(|p| p.name).collect(),
        }),
        other => anyhow::bail!("unexpected display update {other:?}"),
    }
}
