//! Scan-to-basket latency at a lane, through ptys: a framed scanner's Scan frame goes in, the
//! lane display's Total frame comes out; in between the hub decodes the frame, looks the product
//! up, updates the basket and encodes the display update (the basket save follows it). Wire time is the
//! round trip of a frame through a bare pty pair measured in the same run, and is subtracted.
//! Also: frames decoded per second by the accumulator, in memory. Prints a table.
//!
//! Run: `cargo bench -p e2e-tests --bench lane_latency` (`BENCH_SCANS` sets the scans, default 2000).

use std::time::{Duration, Instant};

use device_sim::{FramedSim, Port};
use e2e_tests::store::StoreFixture;
use edge_agent::config::Config;
use edge_agent::ledger::Ledger;
use firmware_proto as fp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Round trip of one scan-sized frame through a pty pair and back: the wire time of the path.
async fn pty_round_trip(samples: usize) -> Vec<Duration> {
    let (mut master, slave) = SerialStream::pair().unwrap();
    let slave_name = slave.name().unwrap();
    drop(slave);
    let mut slave =
        tokio_serial::SerialPortBuilderExt::open_native_async(tokio_serial::new(slave_name, 115_200)).unwrap();
    let env = fp::Envelope::new("lane-1-scanner", 1, 1, fp::Body::Scan(fp::Scan::new("", b"4006381333931").unwrap()))
        .unwrap();
    let frame = fp::frame::encode_vec(&env).unwrap();
    let mut buf = vec![0u8; frame.len()];
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        master.write_all(&frame).await.unwrap();
        slave.read_exact(&mut buf).await.unwrap();
        slave.write_all(&buf).await.unwrap();
        master.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed());
    }
    out
}

fn frames_per_second() -> (usize, Duration) {
    let env =
        fp::Envelope::new("lane-1-scanner", 1, 1, fp::Body::Scan(fp::Scan::new("]E0", b"4006381333931").unwrap()))
            .unwrap();
    let frame = fp::frame::encode_vec(&env).unwrap();
    let count = 500_000;
    let stream: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * count).collect();
    let mut acc = fp::Accumulator::new();
    let mut ok = 0usize;
    let t = Instant::now();
    for chunk in stream.chunks(4096) {
        acc.feed(chunk, |r| {
            if r.is_ok() {
                ok += 1
            }
        });
    }
    let elapsed = t.elapsed();
    assert_eq!(ok, count);
    (count, elapsed)
}

fn main() {
    let scans: usize = std::env::var("BENCH_SCANS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let store = StoreFixture::new(&[]);
    let scanner_path = store.path().join("by-id/lane-1-scanner");
    let display_path = store.path().join("by-id/lane-1-display");
    let config_text = format!(
        "[store]\nid = \"s1\"\ncurrency = \"EUR\"\n[ledger]\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n[[lanes]]\nid = \"lane-1\"\ndouble_read_window_ms = 0\n\
         [[serial]]\nid = \"lane-1-scanner\"\nkind = \"scanner\"\nlane = \"lane-1\"\nmode = \"framed\"\npath = \"{}\"\n\
         [[serial]]\nid = \"lane-1-display\"\nkind = \"lane\"\nlane = \"lane-1\"\npath = \"{}\"\n",
        store.data.display(),
        scanner_path.display(),
        display_path.display()
    );
    let config = Config::parse(&config_text, std::path::Path::new("bench.toml")).unwrap();
    // The hub runs on its own runtime (as in the daemon); the simulated devices on another,
    // so the measurement does not steal the hub's worker threads.
    // `HUB_THREADS` overrides the configured worker count, to compare.
    let hub_threads =
        std::env::var("HUB_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(config.runtime.worker_threads);
    let hub = tokio::runtime::Builder::new_multi_thread().worker_threads(hub_threads).enable_all().build().unwrap();
    let sim = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut scanner, mut display) = sim.block_on(async {
        let scanner = FramedSim::new(Port::pty(&scanner_path).unwrap(), "lane-1-scanner", fp::DeviceKind::Scanner);
        let display = FramedSim::new(Port::pty(&display_path).unwrap(), "lane-1-display", fp::DeviceKind::Lane);
        (scanner, display)
    });
    let opts = edge_agent::daemon::ledger_options(&config);
    let (handle, writer) =
        Ledger::open(&config.ledger.data_dir, &opts).unwrap().start_writer(opts.queue_capacity).unwrap();
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let till = std::sync::Arc::new(std::sync::Mutex::new(edge_agent::labels::sequencing::TillPrices::new(0)));
    hub.block_on(async {
        edge_agent::devices::wiring::start(&config, &handle, &till, &edge_agent::mqtt::presence(&config), &tasks, &stop)
            .unwrap()
    });
    let (latencies, wire) = sim.block_on(async {
        scanner.hello(Duration::from_secs(30)).await.unwrap();
        display.hello(Duration::from_secs(30)).await.unwrap();
        let codes = ["4006381333931", "96385074", "036000291452"];
        let mut latencies = Vec::with_capacity(scans);
        for i in 0..scans {
            if i % 100 == 99 {
                display.input(fp::LaneInput::VoidBasket).await.unwrap();
                display.wait_display(Duration::from_secs(10), |d| matches!(d, fp::LaneDisplay::Cleared)).await.unwrap();
            }
            let scan = fp::Body::Scan(fp::Scan::new("", codes[i % codes.len()].as_bytes()).unwrap());
            let t = Instant::now();
            scanner.send_nowait(scan).await.unwrap();
            display
                .wait_display(Duration::from_secs(10), |d| matches!(d, fp::LaneDisplay::Total { .. }))
                .await
                .unwrap();
            latencies.push(t.elapsed());
            scanner.pump(Duration::from_millis(1)).await.unwrap(); // take the scanner's ack
        }
        (latencies, pty_round_trip(scans).await)
    });
    hub.block_on(async {
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    });
    drop(handle);
    writer.join();
    let mut latencies = latencies;
    let mut wire = wire;
    latencies.sort();
    wire.sort();
    let (frames, decode_time) = frames_per_second();

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("scan -> basket update at a lane through ptys ({scans} scans, hub runtime with {hub_threads} worker thread(s); basket saved after each display update)");
    println!("{:<44} {:>10} {:>10} {:>10}", "", "p50 us", "p99 us", "max us");
    let row = |what: &str, v: &[Duration]| {
        println!(
            "{:<44} {:>10.0} {:>10.0} {:>10.0}",
            what,
            us(percentile(v, 0.5)),
            us(percentile(v, 0.99)),
            us(*v.last().unwrap())
        );
    };
    row("scan frame in -> Total frame out", &latencies);
    row("wire: frame round trip through a bare pty", &wire);
    let p50 = percentile(&latencies, 0.5).saturating_sub(percentile(&wire, 0.5));
    let p99 = percentile(&latencies, 0.99).saturating_sub(percentile(&wire, 0.5));
    println!("{:<44} {:>10.0} {:>10.0}", "excluding wire time", us(p50), us(p99));
    println!(
        "target: p99 excluding wire time < 2000 us: {}",
        if p99 < Duration::from_millis(2) { "met" } else { "NOT met" }
    );
    println!(
        "frames decoded (accumulator, 4 KiB chunks): {} frames in {:.3} s = {:.0} frames/s",
        frames,
        decode_time.as_secs_f64(),
        frames as f64 / decode_time.as_secs_f64()
    );
}
