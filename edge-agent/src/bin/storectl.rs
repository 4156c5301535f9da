//! `storectl`: the store manager's CLI. For now it reads the ledger file directly and
//! read-only, so it works with the daemon up or down. Human tables by default, `--json` for
//! scripts.
//!
//! Exit codes: 0 ok; 1 the ledger failed verification; 64 bad arguments (an invalid SKU or
//! GTIN); 65 the ledger file is not usable; 66 no ledger in the data folder; 74 I/O error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_agent::config::Config;
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
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Re-check the hash chain and the stock projection; exit 1 naming the first bad event.
    Verify,
}

#[derive(Subcommand)]
enum StockCmd {
    /// Stock of one product, by SKU or by --gtin.
    Show(ProductArg),
}

#[derive(Subcommand)]
enum PriceCmd {
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
}

impl From<LedgerError> for Failure {
    fn from(e: LedgerError) -> Failure {
        Failure::Ledger(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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

fn data_dir(cli: &Cli) -> Result<PathBuf, Failure> {
    if let Some(dir) = &cli.data_dir {
        return Ok(dir.clone());
    }
    let config = cli.config.clone().unwrap_or_else(|| PathBuf::from("/etc/edge-agent/config.toml"));
    Config::load(&config).map(|c| c.ledger.data_dir).map_err(|e| Failure::Usage(e.to_string()))
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
    let reader = LedgerReader::open(&data_dir(cli)?)?;
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
    }
}
