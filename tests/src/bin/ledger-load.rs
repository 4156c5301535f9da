//! Appends sales through the real ledger writer as fast as it can, printing `ACK <index>
//! <seq> <replayed>` only after each sale is durable. The crash test kills it with SIGKILL at
//! random moments and checks the ledger against what was acknowledged.
//!
//! Sale `i` sells one unit of `SKU{i % 10}`, plus one of `SKU{(i + 1) % 10}` when `i % 7 == 0`;
//! its idempotency key is `sale:{i}`. Every run first (re)receives 1,000,000 units of each SKU
//! under fixed keys, so receipts are applied once however often the loader restarts.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use edge_agent::ledger::{Command, IdempotencyKey, Ledger, LedgerOptions, SaleLine, Tender};
use shared::{Currency, Money, Sku, StoreId};

pub const SKUS: u64 = 10;

fn sale(i: u64, eur: Currency) -> anyhow::Result<Command> {
    let line = |n: u64| -> anyhow::Result<SaleLine> {
        Ok(SaleLine {
            sku: Sku::new(format!("SKU{}", n % SKUS))?,
            quantity: 1,
            line_total: Money::new(250, eur),
            price: None,
        })
    };
    let mut lines = vec![line(i)?];
    if i % 7 == 0 {
        lines.push(line(i + 1)?);
    }
    Ok(Command::Sale { lines, tender: Tender::Cash })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(args.next().context("usage: ledger-load DATA_DIR FROM [CONCURRENCY]")?);
    let from: u64 = args.next().context("FROM missing")?.parse()?;
    let concurrency: usize = args.next().map(|c| c.parse()).transpose()?.unwrap_or(16);

    let eur = Currency::new("EUR")?;
    let opts = LedgerOptions::new(StoreId::new("crash-store")?, eur);
    let (handle, _writer) = Ledger::open(&data_dir, &opts)?.start_writer(4096)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build()?;
    rt.block_on(async move {
        for s in 0..SKUS {
            let receipt = Command::Receipt {
                sku: Sku::new(format!("SKU{s}"))?,
                quantity: 1_000_000,
                reference: "initial".into(),
            };
            handle.submit(IdempotencyKey::new(format!("receipt:SKU{s}"))?, receipt).await?;
        }
        println!("READY");
        let next = Arc::new(AtomicU64::new(from));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (handle, next) = (handle.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let applied = handle.submit(IdempotencyKey::new(format!("sale:{i}"))?, sale(i, eur)?).await?;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {i} {} {}", applied.seq, applied.replayed)?;
                    out.flush()?;
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })
}
