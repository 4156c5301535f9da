//! The MQTT session, owned by one task. The rumqttc event loop is polled only here (a task that
//! both polls and publishes can stall: rumqttc issue #1025); everyone else publishes through the
//! cloned `AsyncClient`, whose request queue is bounded. On every (re)connection the task
//! subscribes again and publishes the retained `hub/state` `online` (the last will says
//! `offline`), ahead of whatever waits in the request queue, then sends again what the last
//! session left undelivered (`carry`). After an error it waits with capped, jittered backoff
//! before polling on, so a broker restart does not meet every store at once. With `tls` the
//! session runs over TLS (rustls, configured by `mqtt::tls`); a failed handshake is logged as
//! such, with what to check, and retried like any other failure.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Disconnect, Event, LastWill, MqttOptions, Packet, Publish, QoS, Request, Subscribe,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::carry::Carried;
use crate::devices::serial::next_backoff;

/// Publishes queued for the event loop; publishers wait when it is full.
pub const REQUEST_QUEUE: usize = 4096;
/// Batches of received messages waiting for the router; when full the event loop waits (TCP
/// backpressure to the broker), nothing is dropped here.
pub const INCOMING_QUEUE: usize = 1024;
/// Most messages in one batch (rumqttc reads at most 10 packets from the network at a time).
pub const BATCH_MAX: usize = 64;
/// QoS 1 publishes sent and not yet acknowledged by the broker (rumqttc's default).
pub const INFLIGHT_MAX: u16 = 100;
/// Largest MQTT packet read from the broker (a bound on memory per message).
pub const INCOMING_PACKET_MAX: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct LinkSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub max_payload: usize,
    pub state_topic: String,
    pub subscriptions: Vec<String>,
    /// TLS to the broker (`mqtts://`); `None` for plain MQTT.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for LinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    /// As rumqttc read it (a share of its read buffer, not a copy); the router drops a batch
    /// as soon as it has handled it.
    pub payload: bytes::Bytes,
}

pub struct MqttLink {
    pub client: AsyncClient,
    /// Received messages, in order, in batches of up to [`BATCH_MAX`].
    pub incoming: mpsc::Receiver<Vec<Incoming>>,
    /// Whether the session is up, for status and metrics.
    pub connected: watch::Receiver<bool>,
}

/// The retained hub state message (`online` or `offline`).
fn hub_state(topic: &str, state: &str, qos: QoS) -> Publish {
    let mut publish = Publish::new(topic, qos, state);
    publish.retain = true;
    publish
}

pub fn spawn(s: LinkSettings, tasks: &TaskTracker, stop: CancellationToken) -> MqttLink {
    let mut options = MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_clean_session(true);
    options.set_inflight(INFLIGHT_MAX);
    // Oversized payloads are refused (and counted) by the router, not by the client: rumqttc
    // drops the whole connection on a packet over its limit, which would disturb everything
    // else. Up to this many bytes are read in; a broker should cap messages lower.
    options.set_max_packet_size(s.max_payload.max(INCOMING_PACKET_MAX), s.max_payload + 1024);
    options.set_last_will(LastWill::new(s.state_topic.clone(), "offline", QoS::AtLeastOnce, true));
    if let Some((user, pass)) = &s.credentials {
        options.set_credentials(user.clone(), pass.clone());
    }
    if let Some(tls) = &s.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let (incoming_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
    let (connected_tx, connected) = watch::channel(false);
    let publisher = client.clone();
    tasks.spawn(async move {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(15));
        let mut backoff = min;
        let mut logged_down = false;
        let mut failed_attempts: u64 = 0;
        let mut carried = Carried::default();
        // Made once: a fresh `cancelled()` per event would register and drop a waiter each
        // time, for every packet (measured: `cargo bench --bench mqtt_ingest`).
        let cancelled = stop.cancelled();
        tokio::pin!(cancelled);
        loop {
            let event = tokio::select! {
                _ = &mut cancelled => {
                    // A clean goodbye: the broker keeps `offline` retained (the will covers
                    // crashes). After what is still queued when there is room; otherwise at
                    // the head of the event loop's own list: waiting for room would never
                    // end, as nothing polls the queue now. There `offline` goes at QoS 0: it
                    // skips the in-flight window, and a QoS 1 publish sent with the window
                    // full would be parked on a packet id in use while the disconnect went
                    // out, and the broker, told goodbye, would drop the will too.
                    let queued = publisher
                        .try_publish(s.state_topic.clone(), QoS::AtLeastOnce, true, "offline")
                        .and_then(|()| publisher.try_disconnect());
                    if queued.is_err() {
                        eventloop.pending.push_front(Request::Disconnect(Disconnect));
                        let offline = hub_state(&s.state_topic, "offline", QoS::AtMostOnce);
                        eventloop.pending.push_front(Request::Publish(offline));
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(2), async { while eventloop.poll().await.is_ok() {} }).await;
                    return;
                }
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = min;
                    logged_down = false;
                    failed_attempts = 0;
                    let _ = connected_tx.send(true);
                    tracing::info!(broker = %format!("{}:{}", s.host, s.port), "MQTT connected");
                    // Subscribe first, then say "online": the broker handles one connection's
                    // packets in order, so whoever sees "online" can publish to the hub and
                    // be heard (the other order lost a reader's first read in a test).
                    // Both go to the head of the event loop's own pending list, which it sends
                    // before anything in the request queue: not through the queue, which can be
                    // full after an outage (publishers kept queueing while the broker was
                    // down), and a subscription refused there left the hub deaf for good.
                    let mut first: Vec<Request> = s
                        .subscriptions
                        .iter()
                        .map(|topic| Request::Subscribe(Subscribe::new(topic.clone(), QoS::AtLeastOnce)))
                        .collect();
                    // The in-flight window is empty after a clean session starts: no packet
                    // id in use for `online` to collide with.
                    first.push(Request::Publish(hub_state(&s.state_topic, "online", QoS::AtLeastOnce)));
                    for request in first.into_iter().rev() {
                        eventloop.pending.push_front(request);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let mut batch = vec![Incoming { topic: p.topic, payload: p.payload }];
                    // What rumqttc read from the network with this message waits in its state,
                    // and poll() would hand it out next without I/O. Taking the messages among
                    // it now sends them to the router as one batch: one wake-up of the router
                    // instead of one per message (measured: `cargo bench --bench mqtt_ingest`).
                    // Acks and other events need nothing, as below; a ConnAck stays for poll().
                    while batch.len() < BATCH_MAX {
                        match eventloop.state.events.front() {
                            Some(Event::Incoming(Packet::ConnAck(_))) | None => break,
                            Some(_) => {
                                if let Some(Event::Incoming(Packet::Publish(p))) = eventloop.state.events.pop_front() {
                                    batch.push(Incoming { topic: p.topic, payload: p.payload });
                                }
                            }
                        }
                    }
                    if incoming_tx.send(batch).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = connected_tx.send(false);
                    // A publish parked on a packet id still in use (the broker acked out of
                    // order) is in neither list rumqttc hands back, and left there it would
                    // stop the next session from reading its queue.
                    if let Some(parked) = eventloop.state.collision.take() {
                        eventloop.pending.push_back(Request::Publish(parked));
                    }
                    let dropped = carried.take(&mut eventloop.pending);
                    if dropped > 0 {
                        tracing::warn!(dropped, total_dropped = carried.dropped, error_code = "MQTT_CARRIED_DROPPED",
                            "MQTT publishes not delivered before the session dropped were too many to keep; the oldest are lost");
                    }
                    failed_attempts += 1;
                    let broker = format!("{}:{}", s.host, s.port);
                    if !logged_down {
                        if matches!(e, ConnectionError::Tls(_)) {
                            tracing::error!(broker = %broker, error = %e, error_code = "MQTT_TLS",
                                "TLS with the MQTT broker failed; check that [mqtt] ca_file holds the CA that signed the broker's certificate and that the broker's name or address is in that certificate; retrying with backoff");
                        } else {
                            tracing::warn!(broker = %broker, error = %e, error_code = "MQTT_DOWN",
                                "MQTT connection lost or refused; retrying with backoff");
                        }
                        logged_down = true;
                    }
                    tracing::debug!(broker = %broker, attempt = failed_attempts, error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "MQTT connection attempt failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = next_backoff(backoff, min, max);
                }
            }
            // What the last session left undelivered goes out again one at a time, ahead of
            // the request queue, while the in-flight window has room.
            if !carried.is_empty() && eventloop.pending.is_empty() && *connected_tx.borrow() {
                let room = eventloop.state.inflight() < INFLIGHT_MAX && eventloop.state.collision.is_none();
                if let Some(publish) = carried.next(room) {
                    eventloop.pending.push_back(Request::Publish(publish));
                }
            }
        }
    });
    MqttLink { client, incoming, connected }
}
