//! MQTT throughput, each beside a reference measured in the same run:
//! - RFID tag reads ingested by the hub's router through the embedded broker, beside a bare
//!   rumqttc subscriber receiving the same stream;
//! - a chain-wide price change to 50,000 labels planned, encoded and published through the
//!   broker until every PUBACK (target < 2 s), and label acks tracked per second (target >= 20k/s).
//!
//! Both RFID consumers receive from a publisher running at the same time, so one round of each
//! mostly measures how fast the broker and publisher went that moment (single rounds ranged from
//! 0.69x to 1.40x on this machine). The table gives the fastest, median and slowest of several
//! alternating rounds; the ratio and the target compare medians. Two streams: the tags in the
//! readers' fields read again and again (what readers send), and every read a tag not seen
//! before (the worst case for the hub's tag table).
//!
//! CPU time per read (medians), what each consumer costs apart from how fast the broker and
//! publisher went: `worker ns/read` on the runtime's one worker (the bare subscriber's loop; the
//! hub's MQTT link), `router ns/read` on the hub router's own thread. Beside the broker and the
//! publisher the router runs slower than alone (the last row): they share the machine's caches.
//!
//! Run: `cargo bench -p e2e-tests --bench mqtt_ingest` (`BENCH_MESSAGES` sets the RFID messages,
//! each of 10 reads, default 20,000; `BENCH_ROUNDS` the rounds of each consumer, default 7).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_tests::mqtt::free_port;
use edge_agent::devices::registry::Registry;
use edge_agent::labels::planner::{AckStage, LabelContent, Planner, PlannerConfig};
use edge_agent::mqtt::{broker, link, router};
use edge_agent::own_thread;
use edge_agent::rfid::presence::{Presence, PresenceConfig};
use firmware_proto as fp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shared::{Currency, DeviceId, Money, Sku, StoreId};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const READS_PER_MESSAGE: usize = 10;
const TOPIC: &str = "se/v1/s1/dev/rfid/rfid-1/evt";

/// `n` messages of reads of `tags` distinct tags, in turn (each read `n * 10 / tags` times).
fn tag_messages(n: usize, tags: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|m| {
            let mut reads = heapless::Vec::new();
            for r in 0..READS_PER_MESSAGE {
                let serial = ((m * READS_PER_MESSAGE + r) % tags) as u128;
                let epc = (u128::from_str_radix("3074257BF7194E4000000000", 16).unwrap() | serial).to_be_bytes();
                let read = fp::TagRead {
                    epc: heapless::Vec::from_slice(&epc[4..]).unwrap(),
                    antenna: 1,
                    rssi_cdbm: -5000,
                    count: 1,
                };
                let _ = reads.push(read);
            }
            let env = fp::Envelope::new("rfid-1", 1, m as u32 + 1, fp::Body::TagReads(fp::TagReads { reads })).unwrap();
            fp::payload::encode_vec(&env).unwrap()
        })
        .collect()
}

async fn publish_all(port: u16, messages: Arc<Vec<Vec<u8>>>) {
    let mut opts = MqttOptions::new(format!("bench-pub-{}", rand::random::<u32>()), "127.0.0.1", port);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for m in messages.iter() {
        client.publish(TOPIC, QoS::AtLeastOnce, false, m.clone()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    poller.abort();
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the consumers' runtime worker (one worker, checked in `main`: a task spawned
/// there runs on it).
async fn worker_cpu() -> Duration {
    tokio::spawn(async { thread_cpu() }).await.unwrap()
}

/// A consumer's round: wall time to receive the stream, the CPU time the runtime's worker
/// spent meanwhile (the bare subscriber's loop; the hub's MQTT link), and the hub router's
/// thread's (zero for the bare subscriber). CPU time is what each consumer costs, whatever
/// the broker and publisher did meanwhile.
#[derive(Clone, Copy)]
struct Round {
    wall: Duration,
    worker: Duration,
    router: Duration,
}

/// The devices: another runtime (another machine's work in a store), publishing the stream
/// while a consumer receives it.
fn publish(devices: &Handle, port: u16, messages: &Arc<Vec<Vec<u8>>>) -> tokio::task::JoinHandle<()> {
    devices.spawn(publish_all(port, messages.clone()))
}

/// A plain subscriber counting messages: the reference. Its receive loop runs as a task, as the
/// hub's router does.
async fn bare_subscriber(port: u16, messages: Arc<Vec<Vec<u8>>>, round: usize, devices: Handle) -> Round {
    let opts = MqttOptions::new(format!("bench-bare-{round}"), "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    client.subscribe(TOPIC, QoS::AtLeastOnce).await.unwrap();
    while !matches!(eventloop.poll().await, Ok(Event::Incoming(Packet::SubAck(_)))) {}
    let total = messages.len();
    let publisher = publish(&devices, port, &messages);
    let worker = worker_cpu().await;
    let receiver = tokio::spawn(async move {
        let started = Instant::now();
        let mut got = 0;
        while got < total {
            if let Ok(Event::Incoming(Packet::Publish(_))) = eventloop.poll().await {
                got += 1;
            }
        }
        started.elapsed()
    });
    let wall = receiver.await.unwrap();
    let worker = worker_cpu().await - worker;
    publisher.await.unwrap();
    Round { wall, worker, router: Duration::ZERO }
}

/// The hub's own link and router: decoded, deduplicated, SGTIN-decoded and tracked per zone.
/// The link runs as a task on the daemon-shaped runtime, the router on a thread of its own,
/// as in the daemon.
async fn hub_router(port: u16, messages: Arc<Vec<Vec<u8>>>, round: usize, devices: Handle) -> Round {
    let store = StoreId::new("s1").unwrap();
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let mut l = link::spawn(
        link::LinkSettings {
            host: "127.0.0.1".into(),
            port,
            client_id: format!("bench-hub-{round}"),
            credentials: None,
            max_payload: 65_536,
            state_topic: "se/v1/s1/hub/state".into(),
            subscriptions: vec![TOPIC.into()],
            tls: None,
        },
        &tasks,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // connected and subscribed
    let mut r = router::Router::new(
        store,
        65_536,
        Registry::new(None, 60_000),
        std::sync::Arc::new(std::sync::Mutex::new(Presence::new(PresenceConfig::default(), []))),
        HashMap::new(),
    );
    let total_reads = (messages.len() * READS_PER_MESSAGE) as u64;
    let publisher = publish(&devices, port, &messages);
    let worker = worker_cpu().await;
    // The router on a thread of its own, as the daemon runs it (`edge_agent::own_thread`).
    let routed = own_thread::spawn("mqtt-router", async move {
        let (started, cpu) = (Instant::now(), thread_cpu());
        while r.stats.tag_reads < total_reads {
            match l.incoming.recv().await {
                Some(batch) => {
                    for m in batch {
                        r.handle(m);
                    }
                }
                None => break,
            }
        }
        (started.elapsed(), thread_cpu() - cpu)
    })
    .unwrap();
    let (wall, router) = routed.await.unwrap();
    let worker = worker_cpu().await - worker;
    publisher.await.unwrap();
    stop.cancel();
    Round { wall, worker, router }
}

/// The hub's router alone on the same messages, without broker or link: what the link adds is
/// the difference.
fn router_alone(messages: &[Vec<u8>]) -> Duration {
    let mut r = router::Router::new(
        StoreId::new("s1").unwrap(),
        65_536,
        Registry::new(None, 60_000),
        std::sync::Arc::new(std::sync::Mutex::new(Presence::new(PresenceConfig::default(), []))),
        HashMap::new(),
    );
    let incoming: Vec<link::Incoming> =
        messages.iter().map(|m| link::Incoming { topic: TOPIC.into(), payload: m.clone().into() }).collect();
    let started = Instant::now();
    for m in incoming {
        r.handle(m);
    }
    started.elapsed()
}

/// Publishes the label commands through the broker and waits for every PUBACK.
async fn publish_commands(port: u16, payloads: Vec<(String, Vec<u8>)>) -> Duration {
    let mut opts = MqttOptions::new("bench-labels", "127.0.0.1", port);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let total = payloads.len();
    let started = Instant::now();
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                acked += 1;
            }
        }
    });
    for (topic, payload) in payloads {
        client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    acks.await.unwrap();
    started.elapsed()
}

fn labels_bench(labels: usize) -> (Duration, Duration, Vec<(String, Vec<u8>)>) {
    let eur = Currency::new("EUR").unwrap();
    let mut planner = Planner::new(PlannerConfig { batch_max: labels, ..PlannerConfig::default() });
    for i in 0..labels {
        planner.bind(DeviceId::new(format!("esl-{i:06}")).unwrap(), Sku::new(format!("SKU-{:05}", i % 5_000)).unwrap());
    }
    let started = Instant::now();
    for i in 0..labels {
        let label = DeviceId::new(format!("esl-{i:06}")).unwrap();
        let content = LabelContent {
            sku: Sku::new(format!("SKU-{:05}", i % 5_000)).unwrap(),
            name: format!("Product {}", i % 5_000),
            price: Money::new(199 + (i % 5_000) as i64, eur),
            promo: None,
            unit_price: None,
        };
        planner.set_content(&label, content, 0);
    }
    let mut payloads = Vec::with_capacity(labels);
    let batch = planner.next_batch(0);
    for cmd in &batch {
        let body = fp::Body::LabelRender(fp::LabelRender {
            content_hash: cmd.hash,
            name: fp::truncated_str(&cmd.content.name),
            price_minor: cmd.content.price.minor,
            currency: fp::truncated_str("EUR"),
            promo: None,
            unit_price: None,
            expires_ms: 0,
        });
        let env = fp::Envelope::new(cmd.label.as_str(), 1, cmd.command_id, body).unwrap();
        payloads.push((format!("se/v1/s1/dev/esl/{}/cmd", cmd.label), fp::payload::encode_vec(&env).unwrap()));
    }
    let planned = started.elapsed();
    let acks = Instant::now();
    for cmd in &batch {
        planner.on_ack(&cmd.label, cmd.command_id, AckStage::Applied, Some(cmd.hash), 1);
    }
    (planned, acks.elapsed(), payloads)
}

/// Alternating rounds of the bare subscriber and the hub on `stream`, then the router alone;
/// prints the rows and whether the target is met (medians).
fn rfid_section(
    rt: &tokio::runtime::Runtime,
    devices: &tokio::runtime::Runtime,
    port: u16,
    title: &str,
    stream: &Arc<Vec<Vec<u8>>>,
    rounds: usize,
) {
    let reads = (stream.len() * READS_PER_MESSAGE) as f64;
    let (mut bare, mut hub) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..rounds {
            bare.push(bare_subscriber(port, stream.clone(), round, devices.handle().clone()).await);
            hub.push(hub_router(port, stream.clone(), round, devices.handle().clone()).await);
        }
    });
    let walls = |v: &[Round]| {
        let mut w: Vec<Duration> = v.iter().map(|r| r.wall).collect();
        w.sort();
        w
    };
    let per_read = |v: &[Round], part: fn(&Round) -> Duration| {
        let mut c: Vec<Duration> = v.iter().map(part).collect();
        c.sort();
        c[c.len() / 2].as_nanos() as f64 / reads
    };
    let (bare_cpu, hub_cpu) = (per_read(&bare, |r| r.worker), per_read(&hub, |r| r.worker));
    let hub_router_cpu = per_read(&hub, |r| r.router);
    let (bare, hub) = (walls(&bare), walls(&hub));
    let rate = |d: Duration| reads / d.as_secs_f64();
    let median = |v: &[Duration]| v[v.len() / 2];
    println!();
    println!("{title}");
    println!(
        "{:<48} {:>12} {:>12} {:>12} {:>8} {:>14} {:>14}",
        "reads/s", "fastest", "median", "slowest", "ratio", "worker ns/read", "router ns/read"
    );
    let row = |name: &str, v: &[Duration], ratio: f64, cpu: f64, router: f64| {
        println!(
            "{:<48} {:>12.0} {:>12.0} {:>12.0} {:>7.2}x {:>14.0} {:>14.0}",
            name,
            rate(v[0]),
            rate(median(v)),
            rate(v[v.len() - 1]),
            ratio,
            cpu,
            router
        );
    };
    row("bare rumqttc subscriber (receive only)", &bare, 1.0, bare_cpu, 0.0);
    let ratio = rate(median(&hub)) / rate(median(&bare));
    row("hub link + router (decode, dedup, SGTIN, zones)", &hub, ratio, hub_cpu, hub_router_cpu);
    let mut alone: Vec<Duration> = (0..rounds).map(|_| router_alone(stream)).collect();
    alone.sort();
    println!(
        "{:<48} {:>12.0} {:>12.0} {:>12.0}",
        "(hub router alone, no broker: its share)",
        rate(alone[0]),
        rate(median(&alone)),
        rate(alone[alone.len() - 1])
    );
    let met = ratio >= 0.8 && rate(median(&hub)) >= 100_000.0;
    println!("target: hub >= 0.8x bare and >= 100000 reads/s (medians): {}", if met { "met" } else { "NOT met" });
}

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let port = free_port();
    broker::start_embedded(format!("127.0.0.1:{port}").parse().unwrap(), 65_536).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The consumers run on a runtime shaped like the daemon's (`[runtime] worker_threads`); the
    // publisher, standing in for the devices, on one of its own.
    let workers = edge_agent::config::RuntimeSection::default().worker_threads;
    assert_eq!(workers, 1, "worker_cpu() reads the one worker's clock; measure otherwise with more");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("consumer")
        .enable_all()
        .build()
        .unwrap();
    let devices = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("devices")
        .enable_all()
        .build()
        .unwrap();
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(7).max(1);
    let reads = messages * READS_PER_MESSAGE;
    println!("RFID tag reads through the embedded broker ({messages} messages of {READS_PER_MESSAGE} reads, {rounds} rounds of each consumer, alternating)");
    // What readers send: the tags in their fields, read again and again (an inventory reads a
    // shelf every few seconds; most reads fall in the dedup window).
    let steady = Arc::new(tag_messages(messages, reads / 10));
    let title = format!("{} tags in the readers' fields, each read 10 times", reads / 10);
    rfid_section(&rt, &devices, port, &title, &steady, rounds);
    // The worst case: every read is of a tag never seen (a hub starting beside full shelves).
    let first_sight = Arc::new(tag_messages(messages, reads));
    rfid_section(&rt, &devices, port, "every read a tag not seen before (worst case)", &first_sight, rounds);

    let (planned, acks, payloads) = labels_bench(50_000);
    let n = payloads.len();
    let published = rt.block_on(publish_commands(port, payloads));
    println!(
        "chain-wide price change: {n} labels planned and encoded in {:.3} s, published to the broker (all PUBACKs) in {:.3} s: {:.3} s in all (target < 2 s)",
        planned.as_secs_f64(),
        published.as_secs_f64(),
        (planned + published).as_secs_f64()
    );
    println!(
        "label acks tracked: {n} in {:.3} s = {:.0} acks/s (target >= 20000/s)",
        acks.as_secs_f64(),
        n as f64 / acks.as_secs_f64()
    );
}
