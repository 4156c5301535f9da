//! The embedded broker (rumqttd) the daemon starts when no broker is configured: for demos,
//! tests and small stores. It keeps messages in memory and has no shutdown API (it lives as
//! long as the process); it is sized with generous segments so acknowledged QoS 1 messages are
//! not dropped to a slow subscriber (DESIGN 12). Production stores use their own broker.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker configuration rejected: {0}")]
    Config(String),
    #[error("cannot start the embedded broker's or the router's thread: {0}")]
    Thread(std::io::Error),
}

/// Starts rumqttd listening on `listen` (MQTT 3.1.1) on a thread of its own.
pub fn start_embedded(listen: SocketAddr, max_payload: usize) -> Result<(), BrokerError> {
    // rumqttd keeps one log per subscription filter in segments of `max_segment_size` bytes
    // (4 + topic + payload per message) and drops the oldest segment past `max_segment_count`;
    // a subscriber that far behind loses messages. A label command or ack is under 200 bytes,
    // so a 5,000-label change (5,000 commands, 5,000 acks) is about 1 MB, and a subscriber
    // would have to fall 10 x 100 MiB, some 5 million label messages, behind. (Measured in
    // the label story: every ack a label sent reached the hub's router.)
    let config = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "edge-agent-embedded"
listen = "{listen}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 1000
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&config).map_err(|e| BrokerError::Config(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, error_code = "MQTT_BROKER", "Embedded MQTT broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // Wait until it answers MQTT, so the hub's first connection attempt succeeds instead of
    // logging a refused connection at every start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !answers_mqtt(listen) {
        if std::time::Instant::now() >= deadline {
            return Err(BrokerError::Config(format!("the embedded broker is not accepting connections on {listen}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::info!(listen = %listen, "Embedded MQTT broker started");
    Ok(())
}

/// A complete MQTT 3.1.1 CONNECT / CONNACK / DISCONNECT exchange (a bare TCP probe would make
/// the broker log a broken connection).
fn answers_mqtt(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    const CONNECT: &[u8] = &[
        0x10, 17, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0a, 0x00, 0x05, b'p', b'r', b'o', b'b', b'e',
    ];
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(500)));
    let mut connack = [0u8; 4];
    let ok =
        s.write_all(CONNECT).is_ok() && s.read_exact(&mut connack).is_ok() && connack[0] == 0x20 && connack[3] == 0;
    let _ = s.write_all(&[0xe0, 0x00]);
    ok
}
