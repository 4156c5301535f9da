//! `storectl`: the store manager's CLI. Writes (stock movements, store prices, pickup order
//! picks and handovers, sync now) go through the running daemon's control socket, since the
//! ledger has one writer; reads work
//! with the daemon up or down (down, they read the ledger file read-only and say so). Human
//! tables by default, `--json` for scripts.
//!
//! Exit codes: 0 ok; 1 the ledger failed verification; 3 `status` or `devices`: the daemon is
//! not running (what its files hold is shown, read-only);
//! 64 bad arguments (an invalid SKU, GTIN or price); 65 the ledger file (or, for `devices` with
//! the daemon down, the device registry file) is not usable, or the
//! ledger refused the command (a wrong pickup code, an order cancelled by HQ, ...); 66 no ledger in the data folder; 69 the daemon is not running
//! (a write needs it); 74 I/O error; 75 the daemon could not do it now (retry); 77 no
//! permission to use the control socket; 78 the feature is not configured on this daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_agent::config::Config;
mod doctor;
mod orders;

use edge_agent::control::client::{call, ClientError};
use edge_agent::control::protocol::{Cmd as ControlCmd, ErrorCode};
use edge_agent::devices::registry_store::{self, RegistryStore};
use edge_agent::ledger::{LedgerError, LedgerReader};
use serde_json::json;
use shared::{effective_price, Gtin, Sku};

#[derive(Parser)]
#[command(name = "storectl", version, about = "store-edge store manager CLI")]
struct Cli {
    /// The daemon's data folder (where ledger.db lives).
    #[arg(long, global = true, conflicts_with = "config")]
    data_dir: Option<PathBuf>,
    /// Take the data folder from the daemon's configuration file instead.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's control socket (default: from the configuration, else `control.sock` in
    /// the data folder).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Is the daemon running, and how are its ledger, broker and cloud sync doing.
    Status,
    /// The event log.
    Ledger {
        #[command(subcommand)]
        command: LedgerCmd,
    },
    /// Stock on hand.
    Stock {
        #[command(subcommand)]
        command: StockCmd,
    },
    /// Prices.
    Price {
        #[command(subcommand)]
        command: PriceCmd,
    },
    /// Shelf labels.
    Labels {
        #[command(subcommand)]
        command: LabelsCmd,
    },
    /// Cloud sync.
    Sync {
        #[command(subcommand)]
        command: SyncCmd,
    },
    /// Online pickup orders: list, show, pick, hand over (with the customer's pickup code),
    /// and those at risk.
    Orders {
        #[command(subcommand)]
        command: orders::OrdersCmd,
    },
    /// The online allocation: what each SKU grants the online channel.
    Online {
        #[command(subcommand)]
        command: orders::OnlineCmd,
    },
    /// MQTT devices (labels, RFID readers): online, firmware, battery, signal, last seen.
    Devices,
    /// Check this store PC: ledger file, free disk, daemon, clock against the cloud, broker,
    /// serial ports. Each check gives a verdict and a hint; exit 1 when one fails.
    Doctor,
    /// Copy the ledger while the daemon runs (online, consistent), then verify the copy. A
    /// store restored from the copy catches up with the cloud before it grants units online or
    /// hands orders over (it may have missed cancellations and handovers since).
    Backup {
        /// The backup file to create (it must not exist).
        path: PathBuf,
    },
    /// Print shell completions for storectl.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum LabelsCmd {
    /// Labels not showing what they should (staff fix these at the shelf).
    Mismatch,
    /// How many labels are up to date, pending, in flight, failed, expired.
    Status,
    /// Send every label (or those of one SKU) its content again, and watch it go out
    /// (Ctrl-C stops watching; the labels keep updating).
    Repush {
        sku: Option<String>,
        /// Ask and return at once, without watching.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum SyncCmd {
    /// Where this store stands with the cloud.
    Status,
    /// Sync with the cloud now instead of at the next interval.
    Now,
}

/// Makes a write safe to retry: the same key applies once.
#[derive(clap::Args)]
struct KeyArg {
    /// Idempotency key: running the command again with the same key changes nothing more.
    /// Default: a new random key.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Re-check the hash chain and the stock projection; exit 1 naming the first bad event.
    Verify,
    /// Every event, for auditors and spreadsheets: JSON lines (default) or CSV.
    Export {
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Subcommand)]
enum StockCmd {
    /// Stock of one product, by SKU or by --gtin.
    Show(ProductArg),
    /// Correct stock by a signed movement (breakage, theft found, ...).
    Adjust {
        sku: String,
        /// Units to add (positive) or remove (negative, after `--`).
        #[arg(allow_negative_numbers = true)]
        movement: i64,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Record goods received.
    Receive {
        sku: String,
        quantity: i64,
        /// Delivery note or order reference.
        #[arg(long, default_value = "")]
        reference: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Record a count: the movement from what the system saw to what was counted.
    Count {
        sku: String,
        counted: i64,
        #[command(flatten)]
        key: KeyArg,
    },
}

#[derive(Subcommand)]
enum PriceCmd {
    /// Set this store's price (regular, or with --promotion a promotion; optional window).
    Set {
        sku: String,
        /// The price, e.g. 1.29.
        amount: String,
        #[arg(long)]
        promotion: bool,
        /// Start of the window, Unix milliseconds (default: now, when --until-ms is given).
        #[arg(long)]
        from_ms: Option<u64>,
        /// End of the window, Unix milliseconds.
        #[arg(long)]
        until_ms: Option<u64>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// A promotion this many percent below the price charged now (e.g. short-dated goods).
    Markdown {
        sku: String,
        #[arg(long)]
        percent: u8,
        /// End of the markdown, Unix milliseconds (default: none).
        #[arg(long)]
        until_ms: Option<u64>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Price registers of one product and the price charged now.
    Show {
        #[command(flatten)]
        product: ProductArg,
        /// Resolve the price at this Unix time in milliseconds instead of now.
        #[arg(long)]
        at_ms: Option<u64>,
    },
}

#[derive(clap::Args)]
struct ProductArg {
    /// The product's SKU.
    #[arg(required_unless_present = "gtin")]
    sku: Option<String>,
    /// Look the product up by GTIN (8, 12, 13 or 14 digits) instead.
    #[arg(long, conflicts_with = "sku")]
    gtin: Option<String>,
}

enum Failure {
    Usage(String),
    Ledger(LedgerError),
    Verify(String),
    Control(ClientError),
    /// `status` with the daemon down: printed already, exit 3.
    NotRunning,
    Io(String),
    /// `doctor` found a failing check: printed already, exit 1.
    Unhealthy,
    /// Refused for a reason the message gives (exit 65, as the daemon's refusals).
    Refused(String),
    /// A file of the data folder is damaged or not ours (exit 65, as an unusable ledger).
    Unusable(String),
}

impl From<LedgerError> for Failure {
    fn from(e: LedgerError) -> Failure {
        Failure::Ledger(e)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 64 (README).
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(64)
        }
        Err(Failure::Verify(msg)) => {
            eprintln!("ledger verification FAILED: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::NotRunning) => ExitCode::from(3),
        Err(Failure::Unhealthy) => ExitCode::from(1),
        Err(Failure::Refused(msg)) | Err(Failure::Unusable(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(65)
        }
        Err(Failure::Io(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(74)
        }
        Err(Failure::Control(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(match &e {
                ClientError::NotRunning { .. } => 69,
                ClientError::Refused(body) => match body.code {
                    ErrorCode::BadRequest => 64,
                    ErrorCode::Refused => 65,
                    ErrorCode::NotConfigured => 78,
                    ErrorCode::Unavailable => 75,
                },
                ClientError::NoPermission { .. } => 77,
                ClientError::Io(e) if e.contains("timed out") || e.contains("temporarily unavailable") => 75,
                ClientError::Io(_) => 74,
            })
        }
        Err(Failure::Ledger(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(match &e {
                LedgerError::CannotOpen { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 66,
                e if e.is_bad_file() || matches!(e, LedgerError::TooOld { .. }) => 65,
                _ => 74,
            })
        }
    }
}

/// The data folder and the control socket, from the flags or the daemon's configuration.
fn paths(cli: &Cli) -> Result<(PathBuf, PathBuf), Failure> {
    let (data, socket) = match &cli.data_dir {
        Some(dir) => (dir.clone(), dir.join("control.sock")),
        None => {
            let config = cli.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            let config = Config::load(&config).map_err(|e| Failure::Usage(e.to_string()))?;
            (config.ledger.data_dir.clone(), config.control_socket())
        }
    };
    Ok((data, cli.socket.clone().unwrap_or(socket)))
}

/// Where the daemon's configuration lives when installed (see `systemd/edge-agent.service`).
const DEFAULT_CONFIG: &str = "/etc/edge-agent/config.toml";

const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn random_key() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends a write to the daemon and prints what it recorded.
fn write(cli: &Cli, socket: &Path, cmd: ControlCmd) -> Result<(), Failure> {
    let key = match &cmd {
        ControlCmd::StockAdjust { key, .. }
        | ControlCmd::StockReceive { key, .. }
        | ControlCmd::StockCount { key, .. }
        | ControlCmd::PriceSet { key, .. } => Some(key.clone()),
        _ => None,
    };
    let answer = call(socket, cmd, CONTROL_TIMEOUT).map_err(|e| {
        // The daemon may have applied it before the failure reached us: the same key makes a
        // retry safe.
        if let (Some(key), ClientError::Io(_)) = (&key, &e) {
            eprintln!("to retry without applying it twice, run the same command with --key {key}");
        }
        Failure::Control(e)
    })?;
    if cli.json {
        println!("{answer}");
    } else {
        let replayed = if answer["replayed"].as_bool() == Some(true) {
            " (already recorded earlier: nothing changed)"
        } else {
            ""
        };
        println!("recorded as event {} ({}){replayed}", answer["seq"], answer["event"].as_str().unwrap_or("?"));
    }
    Ok(())
}

fn resolve_sku(reader: &LedgerReader, product: &ProductArg) -> Result<Sku, Failure> {
    if let Some(gtin) = &product.gtin {
        let gtin = Gtin::parse(gtin).map_err(|e| Failure::Usage(e.to_string()))?;
        let skus = reader.skus_by_gtin(&gtin)?;
        return match skus.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Failure::Usage(format!("no product with GTIN {gtin} in the catalog"))),
            many => Err(Failure::Usage(format!(
                "GTIN {gtin} belongs to several SKUs ({}); name the SKU",
                many.iter().map(Sku::to_string).collect::<Vec<_>>().join(", ")
            ))),
        };
    }
    let sku = product.sku.as_deref().unwrap_or_default();
    Sku::new(sku).map_err(|e| Failure::Usage(e.to_string()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let (data_dir, socket) = paths(cli)?;
    let key = |k: &KeyArg| k.key.clone().unwrap_or_else(random_key);
    match &cli.command {
        Cmd::Status => return status(cli, &data_dir, &socket),
        Cmd::Stock { command: StockCmd::Adjust { sku, movement, reason, key: k } } => {
            let cmd =
                ControlCmd::StockAdjust { key: key(k), sku: sku.clone(), movement: *movement, reason: reason.clone() };
            return write(cli, &socket, cmd);
        }
        Cmd::Stock { command: StockCmd::Receive { sku, quantity, reference, key: k } } => {
            let cmd = ControlCmd::StockReceive {
                key: key(k),
                sku: sku.clone(),
                quantity: *quantity,
                reference: reference.clone(),
            };
            return write(cli, &socket, cmd);
        }
        Cmd::Stock { command: StockCmd::Count { sku, counted, key: k } } => {
            return write(cli, &socket, ControlCmd::StockCount { key: key(k), sku: sku.clone(), counted: *counted });
        }
        Cmd::Price { command: PriceCmd::Set { sku, amount, promotion, from_ms, until_ms, key: k } } => {
            let cmd = ControlCmd::PriceSet {
                key: key(k),
                sku: sku.clone(),
                amount: Some(amount.clone()),
                promotion: *promotion,
                from_ms: *from_ms,
                until_ms: *until_ms,
            };
            return write(cli, &socket, cmd);
        }
        Cmd::Price { command: PriceCmd::Markdown { sku, percent, until_ms, key: k } } => {
            if !(1..=99).contains(percent) {
                return Err(Failure::Usage(format!("--percent must be between 1 and 99, got {percent}")));
            }
            let reader = LedgerReader::open(&data_dir)?;
            let sku_id = Sku::new(sku.clone()).map_err(|e| Failure::Usage(e.to_string()))?;
            let entries = reader.prices(&sku_id)?;
            let now = now_ms();
            // Marked down from the price without any store promotion, so a markdown never
            // compounds on an earlier one.
            let own_promo = |e: &&shared::PriceEntry| {
                e.key.slot == shared::PriceSlot::Promotion
                    && e.key.scope == shared::PriceScope::Store(reader.store().clone())
            };
            let entries: Vec<shared::PriceEntry> = entries.iter().filter(|e| !own_promo(e)).cloned().collect();
            let effective = effective_price(&entries, &sku_id, reader.store(), now)
                .and_then(|e| e.value.as_ref().map(|v| (v.amount, e.stamp.clone())))
                .ok_or_else(|| Failure::Usage(format!("{sku} has no price in effect to mark down")))?;
            let (current, stamp) = effective;
            // Run twice, the same markdown of the same price applies once (not 30% of 30% off).
            let default_key = format!("markdown:{sku}:{percent}:{}.{}", stamp.wall_ms, stamp.logical);
            // Rounded down to the minor unit: a markdown never charges more than it says.
            // In i128: a price read from the ledger must not overflow the arithmetic.
            let minor = (i128::from(current.minor) * i128::from(100 - percent) / 100) as i64;
            let amount = shared::Money::new(minor, current.currency).to_string();
            let amount = amount.split_whitespace().next().unwrap_or(&amount).to_owned();
            let cmd = ControlCmd::PriceSet {
                key: k.key.clone().unwrap_or(default_key),
                sku: sku.clone(),
                amount: Some(amount),
                promotion: true,
                from_ms: until_ms.map(|_| now),
                until_ms: *until_ms,
            };
            return write(cli, &socket, cmd);
        }
        Cmd::Labels { command: LabelsCmd::Mismatch } => {
            let answer = call(&socket, ControlCmd::LabelsMismatch, CONTROL_TIMEOUT).map_err(Failure::Control)?;
            if cli.json {
                println!("{answer}");
            } else {
                let rows = answer["mismatched"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!("every label shows what it should");
                } else {
                    println!("{} labels do not show the price they should:", rows.len());
                    println!("  {:<32} SKU", "LABEL");
                    for r in rows {
                        println!("  {:<32} {}", r["label"].as_str().unwrap_or("?"), r["sku"].as_str().unwrap_or("?"));
                    }
                }
            }
            return Ok(());
        }
        Cmd::Labels { command: LabelsCmd::Status } => {
            let answer = call(&socket, ControlCmd::LabelsStatus, CONTROL_TIMEOUT).map_err(Failure::Control)?;
            if cli.json {
                println!("{answer}");
            } else {
                let st = &answer["stages"];
                println!(
                    "{} labels: {} up to date, {} pending, {} in flight, {} failed, {} expired; {} not showing what they should",
                    answer["labels"], st["up_to_date"], st["pending"], st["in_flight"], st["failed"], st["expired"], answer["mismatched"]
                );
            }
            return Ok(());
        }
        Cmd::Labels { command: LabelsCmd::Repush { sku, no_wait } } => {
            return repush(cli, &socket, sku.clone(), *no_wait)
        }
        Cmd::Sync { command: SyncCmd::Now } => {
            call(&socket, ControlCmd::SyncNow, CONTROL_TIMEOUT).map_err(Failure::Control)?;
            if cli.json {
                println!("{}", json!({ "requested": true }));
            } else {
                println!("sync requested; `storectl sync status` shows when it is done");
            }
            return Ok(());
        }
        Cmd::Sync { command: SyncCmd::Status } => return sync_status(cli, &data_dir, &socket),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "storectl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Cmd::Devices => return devices(cli, &socket, &data_dir),
        Cmd::Orders { command } => return orders::run(cli.json, &data_dir, &socket, command),
        Cmd::Online { command } => return orders::online(cli.json, &data_dir, &socket, command),
        Cmd::Doctor => {
            // The configuration `paths` used: the one given, or the default when no
            // --data-dir was given.
            let default = PathBuf::from(DEFAULT_CONFIG);
            let config = cli.config.as_deref().or(cli.data_dir.is_none().then_some(default.as_path()));
            return doctor::run(cli.json, config, &data_dir, &socket);
        }
        Cmd::Backup { path } => return backup(cli, &data_dir, path),
        _ => {}
    }
    let reader = LedgerReader::open(&data_dir)?;
    match &cli.command {
        Cmd::Ledger { command: LedgerCmd::Verify } => match reader.verify()? {
            Ok(report) => {
                if cli.json {
                    println!("{}", json!({ "ok": true, "report": report }));
                } else {
                    println!(
                        "ledger OK: {} events, chain head {} ({}...), stock of {} SKUs matches the events",
                        report.events,
                        report.head_seq,
                        &report.head_hash[..16.min(report.head_hash.len())],
                        report.skus_checked
                    );
                }
                Ok(())
            }
            Err(broken) => {
                if cli.json {
                    println!("{}", json!({ "ok": false, "first_bad_seq": broken.seq, "detail": broken.detail }));
                }
                Err(Failure::Verify(broken.to_string()))
            }
        },
        Cmd::Stock { command: StockCmd::Show(product) } => {
            let sku = resolve_sku(&reader, product)?;
            let view = reader.stock(&sku)?;
            if cli.json {
                let slots: Vec<_> =
                    view.slots.iter().map(|(a, s)| json!({ "actor": a, "in": s.inc, "out": s.dec })).collect();
                println!(
                    "{}",
                    json!({ "store": view.store, "sku": view.sku, "on_hand": view.on_hand, "slots": slots })
                );
            } else {
                println!("{} in store {}: {} on hand", view.sku, view.store, view.on_hand);
                if view.slots.is_empty() {
                    println!("  (no stock movements recorded)");
                } else {
                    println!("  {:<24} {:>12} {:>12}", "ACTOR", "IN", "OUT");
                    for (actor, slot) in &view.slots {
                        println!("  {:<24} {:>12} {:>12}", actor, slot.inc, slot.dec);
                    }
                }
            }
            Ok(())
        }
        Cmd::Price { command: PriceCmd::Show { product, at_ms } } => {
            let sku = resolve_sku(&reader, product)?;
            let at = at_ms.unwrap_or_else(now_ms);
            let entries = reader.prices(&sku)?;
            let effective = effective_price(&entries, &sku, reader.store(), at);
            if cli.json {
                let regs: Vec<_> = entries
                    .iter()
                    .map(|e| json!({
                        "scope": e.key.scope.to_string(),
                        "slot": e.key.slot.as_str(),
                        "amount_minor": e.value.as_ref().map(|v| v.amount.minor),
                        "currency": e.value.as_ref().map(|v| v.amount.currency.code().to_owned()),
                        "window": e.value.as_ref().and_then(|v| v.window).map(|w| json!({ "from_ms": w.from_ms, "until_ms": w.until_ms })),
                        "stamp": e.stamp.to_string(),
                    }))
                    .collect();
                let eff = effective.map(|e| {
                    let v = e.value.as_ref().map(|v| v.amount);
                    json!({ "amount_minor": v.map(|a| a.minor), "currency": v.map(|a| a.currency.code().to_owned()), "scope": e.key.scope.to_string(), "slot": e.key.slot.as_str() })
                });
                println!("{}", json!({ "sku": sku.to_string(), "at_ms": at, "effective": eff, "registers": regs }));
            } else {
                match effective.and_then(|e| e.value.as_ref().map(|v| (e, v))) {
                    Some((e, v)) => println!("{sku}: {} (from {} {})", v.amount, e.key.scope, e.key.slot.as_str()),
                    None => println!("{sku}: no price in effect"),
                }
                if !entries.is_empty() {
                    println!("  {:<16} {:<10} {:>14} {:<32} SET AT (HLC)", "SCOPE", "SLOT", "PRICE", "WINDOW (ms)");
                    for e in &entries {
                        let (price, window) = match &e.value {
                            Some(v) => (
                                v.amount.to_string(),
                                v.window
                                    .map(|w| format!("{}..{}", w.from_ms, w.until_ms))
                                    .unwrap_or_else(|| "always".into()),
                            ),
                            None => ("withdrawn".into(), String::new()),
                        };
                        println!(
                            "  {:<16} {:<10} {:>14} {:<32} {}",
                            e.key.scope.to_string(),
                            e.key.slot.as_str(),
                            price,
                            window,
                            e.stamp
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Ledger { command: LedgerCmd::Export { format } } => export(&reader, *format),
        _ => unreachable!("write and daemon commands return above"),
    }
}

/// Writes every event to stdout; a closed pipe (`| head`) ends the export quietly.
fn export(reader: &LedgerReader, format: ExportFormat) -> Result<(), Failure> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |e: std::io::Error| Failure::Io(e.to_string());
    if let ExportFormat::Csv = format {
        writeln!(out, "seq,hlc_wall_ms,hlc_logical,actor,kind,idem_key,hash,body").map_err(io)?;
    }
    let result = reader.for_each_event(|row| -> Result<(), Failure> {
        match format {
            ExportFormat::Jsonl => {
                serde_json::to_writer(&mut out, &row).map_err(|e| Failure::Io(e.to_string()))?;
                out.write_all(b"\n").map_err(io)
            }
            ExportFormat::Csv => {
                let body = serde_json::to_string(&row.body).map_err(|e| Failure::Io(e.to_string()))?;
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{}",
                    row.seq,
                    row.hlc_wall_ms,
                    row.hlc_logical,
                    csv_field(&row.actor),
                    csv_field(&row.kind),
                    csv_field(&row.idem_key),
                    row.hash,
                    csv_field(&body)
                )
                .map_err(io)
            }
        }
    });
    match result.and_then(|()| out.flush().map_err(io)) {
        Err(Failure::Io(e)) if e.contains("Broken pipe") => Ok(()),
        other => other,
    }
}

/// RFC 4180 quoting: a field with a comma, quote or line break is quoted, quotes doubled.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Asks for a repush, then shows progress until nothing is pending or in flight.
fn repush(cli: &Cli, socket: &Path, sku: Option<String>, no_wait: bool) -> Result<(), Failure> {
    use std::io::Write;
    call(socket, ControlCmd::LabelsRepush { sku: sku.clone() }, CONTROL_TIMEOUT).map_err(Failure::Control)?;
    if no_wait {
        println!("{}", if cli.json { json!({ "requested": true }).to_string() } else { "repush requested".into() });
        return Ok(());
    }
    if !cli.json {
        println!(
            "repushing {}; Ctrl-C stops watching (the labels keep updating)",
            sku.as_deref().unwrap_or("every label")
        );
    }
    // The daemon refreshes its label counts once a second: let it see the repush first.
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let answer = call(socket, ControlCmd::LabelsStatus, CONTROL_TIMEOUT).map_err(Failure::Control)?;
        let st = &answer["stages"];
        let (total, done) = (answer["labels"].as_u64().unwrap_or(0), st["up_to_date"].as_u64().unwrap_or(0));
        let open = st["pending"].as_u64().unwrap_or(0) + st["in_flight"].as_u64().unwrap_or(0);
        if !cli.json {
            let width = 30;
            let filled = (done * width).checked_div(total).unwrap_or(width) as usize;
            print!("\r[{}{}] {done}/{total} up to date   ", "#".repeat(filled), " ".repeat(width as usize - filled));
            let _ = std::io::stdout().flush();
        }
        if open == 0 || std::time::Instant::now() > deadline {
            if cli.json {
                println!("{answer}");
            } else {
                println!("\n{} failed, {} expired", st["failed"], st["expired"]);
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

fn devices(cli: &Cli, socket: &Path, data_dir: &Path) -> Result<(), Failure> {
    let (answer, running) = match call(socket, ControlCmd::Devices, CONTROL_TIMEOUT) {
        Ok(answer) => (answer, true),
        // With the daemon down, what it last saved: a technician still sees which devices the
        // store has, their firmware and when each was last heard.
        Err(ClientError::NotRunning { path, reason }) => {
            let saved = RegistryStore::read(data_dir).map_err(|e| match e {
                registry_store::StoreError::Unusable { .. } => Failure::Unusable(format!(
                    "{e}; edge-agent moves an unusable registry aside at its next start and learns the devices again (the ledger is not affected)"
                )),
                registry_store::StoreError::Sqlite { .. } => Failure::Io(e.to_string()),
            })?;
            let answer = saved_registry(saved.unwrap_or_default());
            if !cli.json {
                println!("edge-agent is NOT running (no answer on {path}: {reason})");
                println!("devices as last saved in {}, read-only:", data_dir.join(registry_store::FILE).display());
            }
            (answer, false)
        }
        Err(e) => return Err(Failure::Control(e)),
    };
    if cli.json {
        println!("{answer}");
        return if running { Ok(()) } else { Err(Failure::NotRunning) };
    }
    let devices = answer["devices"].as_array().cloned().unwrap_or_default();
    let online = devices.iter().filter(|d| d["online"].as_bool() == Some(true)).count();
    if running {
        println!("{} devices, {online} online", devices.len());
    } else {
        println!("{} devices", devices.len());
    }
    if !devices.is_empty() {
        println!(
            "  {:<28} {:<6} {:<8} {:<12} {:>7} {:>7} {:>10} {:>7}",
            "DEVICE", "KIND", "STATE", "FIRMWARE", "BATTERY", "SIGNAL", "SEEN", "MISSED"
        );
    }
    let now = now_ms();
    for d in &devices {
        let opt =
            |v: &serde_json::Value, unit: &str| v.as_i64().map(|n| format!("{n}{unit}")).unwrap_or_else(|| "-".into());
        println!(
            "  {:<28} {:<6} {:<8} {:<12} {:>7} {:>7} {:>10} {:>7}",
            d["id"].as_str().unwrap_or("?"),
            d["kind"].as_str().unwrap_or("?"),
            match d["online"].as_bool() {
                Some(true) => "online",
                Some(false) => "OFFLINE",
                None => "-",
            },
            d["firmware"].as_str().unwrap_or("-"),
            opt(&d["battery_pct"], "%"),
            opt(&d["rssi_dbm"], "dBm"),
            d["last_seen_ms"].as_u64().map(|t| format!("{}s ago", now.saturating_sub(t) / 1000)).unwrap_or_default(),
            d["missed_heartbeats"],
        );
    }
    if let Some(q) = answer["quarantined"].as_array().filter(|q| !q.is_empty()) {
        println!("{} unknown devices quarantined (not on the allow-list):", q.len());
        for d in q {
            println!("  {} ({} messages)", d["id"].as_str().unwrap_or("?"), d["messages"]);
        }
    }
    if running {
        Ok(())
    } else {
        Err(Failure::NotRunning)
    }
}

/// The saved registry in the daemon's answer's shape; `online` is null: nobody is listening.
fn saved_registry(saved: registry_store::Loaded) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = saved
        .devices
        .iter()
        .map(|(id, d)| {
            json!({ "id": id.as_str(), "kind": d.kind, "online": null, "firmware": d.firmware, "boot_id": d.boot_id,
                    "last_seen_ms": d.last_seen_ms, "missed_heartbeats": d.missed_heartbeats,
                    "battery_pct": d.battery_pct, "rssi_dbm": d.rssi_dbm })
        })
        .collect();
    let quarantined: Vec<serde_json::Value> =
        saved.quarantined.iter().map(|(id, n)| json!({ "id": id.as_str(), "messages": n })).collect();
    json!({ "daemon": "not running", "read_only": true, "devices": devices, "quarantined": quarantined })
}

/// `storectl backup PATH`: an online copy, marked as a backup (a store restored from it
/// writes as a new actor and catches up with the cloud before it grants or hands over; see
/// `LedgerReader::backup_to`), then the copy's integrity check and chain verify.
fn backup(cli: &Cli, data_dir: &Path, target: &Path) -> Result<(), Failure> {
    let reader = LedgerReader::open(data_dir)?;
    reader.backup_to(target)?;
    let copy = LedgerReader::open_file(target)?;
    if let Err(problem) = copy.integrity_check()? {
        return Err(Failure::Verify(format!("the backup {} is damaged: {problem}", target.display())));
    }
    let report = copy.verify()?.map_err(|b| Failure::Verify(format!("the backup {}: {b}", target.display())))?;
    if cli.json {
        println!(
            "{}",
            json!({ "backup": target.display().to_string(), "verified": true, "events": report.events, "head_hash": report.head_hash })
        );
    } else {
        println!(
            "backup written to {} and verified: {} events, chain head {}",
            target.display(),
            report.events,
            report.head_seq
        );
    }
    Ok(())
}

/// `storectl status`: from the daemon, or, with it down, from the ledger file (exit 3).
fn status(cli: &Cli, data_dir: &Path, socket: &Path) -> Result<(), Failure> {
    match call(socket, ControlCmd::Status, CONTROL_TIMEOUT) {
        Ok(answer) => {
            if cli.json {
                println!("{answer}");
            } else {
                println!(
                    "edge-agent is running for store {} (up {} s)",
                    answer["store"].as_str().unwrap_or("?"),
                    answer["uptime_s"]
                );
                println!(
                    "  ledger:  {} events, writer queue {}",
                    answer["ledger"]["events"], answer["ledger"]["queue_depth"]
                );
                let broker = match answer["broker_connected"].as_bool() {
                    Some(true) => "connected",
                    Some(false) => "NOT connected (the hub retries; see `journalctl -u edge-agent` for MQTT_DOWN)",
                    None => "none (no [mqtt])",
                };
                println!("  broker:  {broker}");
                print_sync(&answer["cloud"]["status"], &answer["sync"]["position"], &answer["sync"]["outbox_rows"]);
                if let Some(n) = answer["labels_mismatched"].as_u64() {
                    println!("  labels:  {n} not showing what they should");
                }
            }
            Ok(())
        }
        Err(ClientError::NotRunning { path, reason }) => {
            let reader = LedgerReader::open(data_dir)?;
            let (position, events, outbox) = (reader.sync_position()?, reader.event_count()?, reader.outbox_depth()?);
            if cli.json {
                println!(
                    "{}",
                    json!({ "daemon": "not running", "read_only": true, "store": reader.store().as_str(),
                            "ledger": { "events": events }, "sync": { "position": position, "outbox_rows": outbox } })
                );
            } else {
                println!("edge-agent is NOT running (no answer on {path}: {reason})");
                println!("from the ledger file, read-only:");
                println!("  ledger:  {events} events");
                println!(
                    "  sync:    {outbox} rows waiting for the cloud; pushed up to version {}",
                    position.pushed_version
                );
            }
            Err(Failure::NotRunning)
        }
        Err(e) => Err(Failure::Control(e)),
    }
}

fn print_sync(status: &serde_json::Value, position: &serde_json::Value, outbox: &serde_json::Value) {
    if status.is_null() {
        println!("  cloud:   not configured (no [cloud]); {outbox} rows in the outbox");
        return;
    }
    let last = status["last_success_ms"].as_u64().map(|t| format!("{} s ago", now_ms().saturating_sub(t) / 1000));
    println!(
        "  cloud:   last sync {}, {} failures in a row{}; {outbox} rows waiting; pushed up to version {}",
        last.unwrap_or_else(|| "never".into()),
        status["consecutive_failures"],
        status["last_error"].as_str().map(|e| format!(" (last error: {e})")).unwrap_or_default(),
        position["pushed_version"]
    );
    if let (Some(rows), Some(configured)) = (status["page_rows"].as_u64(), status["configured_page_rows"].as_u64()) {
        if rows < configured {
            println!(
                "           pages cut to {rows} rows (of {configured}): the cloud refused larger ones {} times; \
                 raise its server.max_body_bytes or lower [cloud] page_rows",
                status["pages_too_large"]
            );
        }
    }
}

/// `storectl sync status`: the daemon's view, or the ledger's with the daemon down.
fn sync_status(cli: &Cli, data_dir: &Path, socket: &Path) -> Result<(), Failure> {
    match call(socket, ControlCmd::SyncStatus, CONTROL_TIMEOUT) {
        Ok(answer) => {
            if cli.json {
                println!("{answer}");
            } else {
                print_sync(&answer["status"], &answer["position"], &answer["outbox_rows"]);
            }
            Ok(())
        }
        Err(ClientError::NotRunning { path, .. }) => {
            let reader = LedgerReader::open(data_dir)?;
            let (position, outbox) = (reader.sync_position()?, reader.outbox_depth()?);
            if cli.json {
                println!(
                    "{}",
                    json!({ "daemon": "not running", "read_only": true, "position": position, "outbox_rows": outbox })
                );
            } else {
                eprintln!("edge-agent is not running (no answer on {path}); from the ledger file, read-only:");
                println!("  {outbox} rows waiting for the cloud; pushed up to version {}", position.pushed_version);
            }
            Ok(())
        }
        Err(e) => Err(Failure::Control(e)),
    }
}
