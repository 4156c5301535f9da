//! A fleet of simulated shelf labels on one MQTT connection: each label checks in, applies the
//! render commands addressed to it and acks them with the content hash it now shows. Labels can
//! be made silent (never ack) to play a dead battery, from the start or at any moment (a label
//! that showed a price, then stopped taking updates). Counts what each label was told.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_proto as fp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Request, Subscribe};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelStats {
    pub commands: u32,
    /// The content hash the label shows.
    pub shows: Option<u64>,
    /// New commands (not transport re-deliveries of the same one) for the content it already
    /// showed: the hub telling it twice.
    pub repeats: u32,
    /// MQTT at-least-once re-deliveries of a command it had received.
    pub redeliveries: u32,
    /// The highest command id (the hub's sequence number) among the repeats: tells a repeat the
    /// hub decided late from an early one that arrived late.
    pub last_repeat: Option<u32>,
    last_command: Option<(u32, u32)>,
    pub last_price_minor: Option<i64>,
}

#[derive(Clone)]
pub struct EslFleet {
    pub stats: Arc<Mutex<HashMap<String, LabelStats>>>,
    pub client: AsyncClient,
    silent: Arc<Mutex<HashSet<String>>>,
}

impl EslFleet {
    /// Connects the fleet for `store` and checks every label in.
    pub fn start(host: &str, port: u16, store: &str, labels: &[String], silent: HashSet<String>) -> EslFleet {
        let mut opts = MqttOptions::new(format!("esl-fleet-{}", rand::random::<u32>()), host, port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 65_536);
        let stats: Arc<Mutex<HashMap<String, LabelStats>>> =
            Arc::new(Mutex::new(labels.iter().map(|l| (l.clone(), LabelStats::default())).collect()));
        let boot: u32 = rand::random();
        let seq = Arc::new(std::sync::atomic::AtomicU32::new(1));
        // Check-ins are queued before the event loop runs, so they go out before any ack (an ack
        // is queued only once a command came in, through the subscription sent at ConnAck ahead
        // of them): a label never reports "blank" after it applied a command.
        for label in labels {
            let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = fp::Body::LabelCheckIn(fp::LabelCheckIn { shown_hash: 0, battery_pct: 90, rssi_dbm: -60 });
            if let Some(bytes) = encode(label, boot, n, body) {
                let _ =
                    client.try_publish(format!("se/v1/{store}/dev/esl/{label}/evt"), QoS::AtLeastOnce, false, bytes);
            }
        }
        let silent = Arc::new(Mutex::new(silent));
        let (fleet_client, fleet_stats, store) = (client.clone(), stats.clone(), store.to_owned());
        let fleet_silent = silent.clone();
        let cmd_filter = format!("se/v1/{store}/dev/esl/+/cmd");
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // Ahead of the acks waiting in the request queue, and never refused by it
                    // when full (as `edge_agent::mqtt::link` does for the hub).
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        eventloop
                            .pending
                            .push_front(Request::Subscribe(Subscribe::new(cmd_filter.clone(), QoS::AtLeastOnce)));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(env) = fp::payload::decode(&p.payload) else { continue };
                        let fp::Body::LabelRender(render) = env.body else { continue };
                        let label = env.device.to_string();
                        if fleet_silent.lock().unwrap().contains(&label) {
                            if let Some(s) = fleet_stats.lock().unwrap().get_mut(&label) {
                                s.commands += 1;
                            }
                            continue;
                        }
                        {
                            let mut all = fleet_stats.lock().unwrap();
                            let Some(s) = all.get_mut(&label) else { continue };
                            s.commands += 1;
                            if s.last_command == Some((env.boot_id, env.seq)) {
                                s.redeliveries += 1;
                            } else if s.shows == Some(render.content_hash) {
                                s.repeats += 1;
                                s.last_repeat = s.last_repeat.max(Some(env.seq));
                            }
                            s.last_command = Some((env.boot_id, env.seq));
                            s.shows = Some(render.content_hash);
                            s.last_price_minor = Some(render.promo.map_or(render.price_minor, |p| p.price_minor));
                        }
                        let ack = fp::Body::CommandAck(fp::CommandAck {
                            of_seq: env.seq,
                            stage: fp::AckStage::Applied,
                            content_hash: Some(render.content_hash),
                            code: 0,
                        });
                        let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(bytes) = encode(&label, boot, n, ack) {
                            let _ = fleet_client.try_publish(
                                format!("se/v1/{store}/dev/esl/{label}/ack"),
                                QoS::AtLeastOnce,
                                false,
                                bytes,
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        EslFleet { stats, client, silent }
    }

    /// From now on `label` keeps showing what it shows and answers nothing (a broken display).
    pub fn silence(&self, label: &str) {
        self.silent.lock().unwrap().insert(label.to_owned());
    }

    /// What each label was told and shows.
    pub fn snapshot(&self) -> HashMap<String, LabelStats> {
        self.stats.lock().unwrap().clone()
    }
}

fn encode(label: &str, boot: u32, seq: u32, body: fp::Body) -> Option<Vec<u8>> {
    let env = fp::Envelope::new(label, boot, seq, body).ok()?;
    fp::payload::encode_vec(&env).ok()
}
