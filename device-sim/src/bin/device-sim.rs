//! `device-sim`: simulated store devices for a technician or a demo. Each subcommand attaches
//! to a new pty (the hub opens it through the `--pty` symlink, set as the device's `path` in the
//! hub's config) or to a real serial port (`--port`), does its part, and with `--hold` stays
//! attached until Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use device_sim::{FramedSim, PlainScannerSim, Port, Suffix};
use firmware_proto as fp;

#[derive(Parser)]
#[command(name = "device-sim", version, about = "Simulated scanners, scales and lane displays for a store-edge hub")]
struct Cli {
    #[command(subcommand)]
    device: Device,
}

#[derive(Args, Clone)]
struct Attach {
    /// Create a pty and make this path (e.g. a by-id style name from the hub's config) point at it.
    #[arg(long, conflicts_with = "port")]
    pty: Option<PathBuf>,
    /// Use a real serial port instead.
    #[arg(long)]
    port: Option<PathBuf>,
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Stay attached (and print what the hub sends) until Ctrl-C.
    #[arg(long)]
    hold: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum SuffixArg {
    Cr,
    Lf,
    Crlf,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Plain,
    Framed,
}

#[derive(Clone, Copy, ValueEnum)]
enum TenderArg {
    Cash,
    Card,
}

#[derive(Subcommand)]
enum Device {
    /// A barcode scanner: scans the codes given, one per --interval-ms.
    Scanner {
        #[command(flatten)]
        attach: Attach,
        #[arg(long, value_enum, default_value_t = Mode::Plain)]
        mode: Mode,
        /// Framed mode: the device id the hub knows it by.
        #[arg(long, default_value = "scanner-1")]
        name: String,
        #[arg(long, value_enum, default_value_t = SuffixArg::Cr)]
        suffix: SuffixArg,
        /// AIM symbology prefix to send before each code (plain mode), e.g. ]E0.
        #[arg(long)]
        aim: Option<String>,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Plain mode has no handshake: wait this long for the hub to open the port first.
        #[arg(long, default_value_t = 3000)]
        start_delay_ms: u64,
        /// Scan every code twice (a double read).
        #[arg(long)]
        double: bool,
        /// Send line noise before each code.
        #[arg(long)]
        garbage: bool,
        codes: Vec<String>,
    },
    /// A scale: reports some readings in motion, then a stable weight.
    Scale {
        #[command(flatten)]
        attach: Attach,
        #[arg(long, default_value = "scale-1")]
        name: String,
        #[arg(long)]
        grams: i32,
        #[arg(long, default_value_t = 3)]
        motion: u32,
    },
    /// A fleet of shelf labels on an MQTT broker: they check in, apply what the hub renders and
    /// ack it; a summary is printed every few seconds until Ctrl-C.
    Esl {
        /// The store's broker, mqtt://host:port.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "store-001")]
        store: String,
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Label ids are PREFIX-00000, PREFIX-00001, ...
        #[arg(long, default_value = "esl")]
        prefix: String,
        /// The last N labels never answer (dead batteries).
        #[arg(long, default_value_t = 0)]
        silent: usize,
    },
    /// An RFID reader on an MQTT broker: publishes bursts of SGTIN-96 tag reads (with
    /// duplicates), each as an inventory cycle with --cycle (a zone count), and, on demand, a
    /// buffer overflow report.
    Rfid {
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "store-001")]
        store: String,
        #[arg(long, default_value = "rfid-1")]
        name: String,
        #[arg(long, default_value_t = 1)]
        antenna: u8,
        /// Distinct tags per burst (of --gtin, serials from --first-serial).
        #[arg(long, default_value_t = 100)]
        tags: u64,
        /// The tags' GTIN.
        #[arg(long, default_value = "80614141123458")]
        gtin: String,
        /// Digits of the GTIN's GS1 company prefix (6 to 12).
        #[arg(long, default_value_t = 7)]
        company_digits: usize,
        /// Send each burst as an inventory cycle (numbered from this id): the hub counts the
        /// zone's stock from it.
        #[arg(long)]
        cycle: Option<u32>,
        #[arg(long, default_value_t = 1)]
        first_serial: u64,
        /// Each tag read this many times per burst.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long, default_value_t = 1)]
        bursts: u32,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Report this many reads dropped in the reader's buffer after the bursts.
        #[arg(long)]
        overflow: Option<u32>,
    },
    /// A lane display: shows what the hub sends; optionally pays after --tender-after-ms.
    Lane {
        #[command(flatten)]
        attach: Attach,
        #[arg(long, default_value = "lane-1")]
        name: String,
        #[arg(long, value_enum)]
        tender: Option<TenderArg>,
        #[arg(long, default_value_t = 5000)]
        tender_after_ms: u64,
    },
}

fn broker_address(broker: &str) -> anyhow::Result<(String, u16)> {
    broker
        .strip_prefix("mqtt://")
        .and_then(|r| r.rsplit_once(':'))
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
        .with_context(|| format!("--broker {broker:?} is not mqtt://host:port"))
}

fn attach(a: &Attach) -> anyhow::Result<Port> {
    match (&a.pty, &a.port) {
        (Some(link), None) => {
            let port = Port::pty(link).with_context(|| format!("creating a pty at {}", link.display()))?;
            eprintln!("attached: {} -> new pty", link.display());
            Ok(port)
        }
        (None, Some(path)) => Port::open(path, a.baud).with_context(|| format!("opening {}", path.display())),
        _ => bail!("give --pty LINK or --port PATH"),
    }
}

async fn hold_framed(sim: &mut FramedSim) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            r = sim.pump(Duration::from_millis(200)) => {
                r?;
                while let Some(body) = sim.inbox.pop_front() {
                    println!("hub -> {}: {body:?}", sim.name);
                }
            }
        }
    }
}

async fn framed(port: Port, name: &str, kind: fp::DeviceKind) -> anyhow::Result<FramedSim> {
    let mut sim = FramedSim::new(port, name, kind);
    match sim.hello(Duration::from_secs(30)).await? {
        fp::Body::HelloAck(_) => eprintln!("{name}: hub accepted HELLO"),
        other => bail!("{name}: hub refused: {other:?}"),
    }
    Ok(sim)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.device {
        Device::Scanner { attach: a, mode, name, suffix, aim, interval_ms, start_delay_ms, double, garbage, codes } => {
            let port = attach(&a)?;
            match mode {
                Mode::Plain => {
                    let suffix = match suffix {
                        SuffixArg::Cr => Suffix::Cr,
                        SuffixArg::Lf => Suffix::Lf,
                        SuffixArg::Crlf => Suffix::Crlf,
                        SuffixArg::None => Suffix::None,
                    };
                    let mut sim = PlainScannerSim::new(port, suffix, aim.as_deref());
                    tokio::time::sleep(Duration::from_millis(start_delay_ms)).await;
                    for code in &codes {
                        if garbage {
                            sim.garbage(b"\x01\x7f#?\r").await?;
                        }
                        if double {
                            sim.double_scan(code).await?
                        } else {
                            sim.scan(code).await?
                        }
                        println!("scanned {code}");
                        sim.answer_naks(Duration::from_millis(interval_ms)).await?;
                    }
                    if a.hold {
                        tokio::signal::ctrl_c().await?;
                    }
                }
                Mode::Framed => {
                    let mut sim = framed(port, &name, fp::DeviceKind::Scanner).await?;
                    for code in &codes {
                        if garbage {
                            sim.garbage(b"\x01\x02garbage\x00").await?;
                        }
                        sim.scan(code).await?;
                        if double {
                            sim.scan(code).await?;
                        }
                        println!("scanned {code}");
                        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
                    }
                    if a.hold {
                        hold_framed(&mut sim).await?;
                    }
                }
            }
        }
        Device::Scale { attach: a, name, grams, motion } => {
            let mut sim = framed(attach(&a)?, &name, fp::DeviceKind::Scale).await?;
            sim.weigh(grams, motion).await?;
            println!("weighed {grams} g");
            if a.hold {
                hold_framed(&mut sim).await?;
            }
        }
        Device::Rfid {
            broker,
            store,
            name,
            antenna,
            tags,
            gtin,
            company_digits,
            cycle,
            first_serial,
            repeat,
            bursts,
            interval_ms,
            overflow,
        } => {
            let (host, port) = broker_address(&broker)?;
            let epcs: Vec<Vec<u8>> = (first_serial..first_serial.saturating_add(tags))
                .map(|s| device_sim::rfid::sgtin96(&gtin, company_digits, s))
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
            let mut reader = device_sim::rfid::RfidReader::connect(&host, port, &store, &name);
            tokio::time::sleep(Duration::from_millis(300)).await;
            for b in 0..bursts {
                match cycle {
                    Some(first) => {
                        let id = first.wrapping_add(b);
                        reader.count_cycle(id, &epcs, antenna, repeat).await.map_err(anyhow::Error::msg)?;
                        println!("inventory cycle {id}:");
                    }
                    None => reader.read(&epcs, antenna, repeat).await.map_err(anyhow::Error::msg)?,
                }
                println!(
                    "burst {}: {} reads of {tags} tags on antenna {antenna}",
                    b + 1,
                    tags as usize * repeat.max(1)
                );
                tokio::time::sleep(Duration::from_millis(interval_ms)).await;
            }
            if let Some(n) = overflow {
                reader.overflow(n).await.map_err(anyhow::Error::msg)?;
                println!("reported {n} reads dropped");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Device::Esl { broker, store, count, prefix, silent } => {
            let (host, port) = broker_address(&broker)?;
            let labels: Vec<String> = (0..count).map(|i| format!("{prefix}-{i:05}")).collect();
            let dead = labels.iter().rev().take(silent).cloned().collect();
            let fleet = device_sim::esl::EslFleet::start(&host, port, &store, &labels, dead);
            eprintln!("{count} labels of store {store} on {host}:{port}; Ctrl-C stops");
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        let snap = fleet.snapshot();
                        let showing = snap.values().filter(|s| s.shows.is_some()).count();
                        let commands: u32 = snap.values().map(|s| s.commands).sum();
                        let repeats: u32 = snap.values().map(|s| s.repeats).sum();
                        println!("labels showing content: {showing}/{count}; commands received: {commands}; told twice: {repeats}");
                    }
                }
            }
        }
        Device::Lane { attach: a, name, tender, tender_after_ms } => {
            let mut sim = framed(attach(&a)?, &name, fp::DeviceKind::Lane).await?;
            if let Some(t) = tender {
                let until = tokio::time::Instant::now() + Duration::from_millis(tender_after_ms);
                while tokio::time::Instant::now() < until {
                    sim.pump(Duration::from_millis(100)).await?;
                    while let Some(body) = sim.inbox.pop_front() {
                        println!("display: {body:?}");
                    }
                }
                let kind = match t {
                    TenderArg::Cash => fp::TenderKind::Cash,
                    TenderArg::Card => fp::TenderKind::Card,
                };
                sim.input(fp::LaneInput::Tender(kind)).await?;
                let shown =
                    sim.wait_display(Duration::from_secs(30), |d| matches!(d, fp::LaneDisplay::Receipt { .. })).await?;
                for d in shown {
                    println!("display: {d:?}");
                }
            }
            if a.hold {
                hold_framed(&mut sim).await?;
            }
        }
    }
    Ok(())
}
