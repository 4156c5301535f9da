//! Brokers for the MQTT stories: the daemon's embedded rumqttd, or a real mosquitto the test
//! starts on a free loopback port (so it can restart it at will), optionally with a TLS
//! listener beside the plain one, a test client, and a relay that stalls and cuts a client's
//! connection to the broker.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Request, Subscribe};

/// The SGTIN-96 EPC of GTIN 80614141123458 (the EPC Tag Data Standard's example) with this
/// serial number.
pub fn sgtin(serial: u64) -> Vec<u8> {
    let v = u128::from_str_radix("3074257BF7194E4000000000", 16).expect("constant") | u128::from(serial);
    v.to_be_bytes()[4..].to_vec()
}

/// A free loopback port (rumqttd cannot report one it chose itself).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// Which brokers to run a story against: always the embedded one; mosquitto when installed
/// (required under CI=true).
pub fn brokers() -> Vec<BrokerKind> {
    let mut b = vec![BrokerKind::Embedded];
    if Path::new(SBIN_MOSQUITTO).exists() || crate::tool("mosquitto").is_some() {
        b.push(BrokerKind::Mosquitto);
    }
    b
}

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    /// The TLS listener's port, when started with [`Mosquitto::start_with_tls`].
    pub tls_port: Option<u16>,
    conf: std::path::PathBuf,
}

/// PEM files for a broker's TLS listener.
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Debian installs the broker in /usr/sbin, which a non-root PATH may lack.
const SBIN_MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn mosquitto_bin() -> std::path::PathBuf {
    if Path::new(SBIN_MOSQUITTO).exists() {
        return SBIN_MOSQUITTO.into();
    }
    crate::tool("mosquitto").expect("mosquitto is installed")
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        Self::start_inner(dir, None)
    }

    /// A plain listener (for the simulated devices) and a TLS one with these files (for the hub).
    pub fn start_with_tls(dir: &Path, tls: TlsFiles<'_>) -> Mosquitto {
        Self::start_inner(dir, Some(tls))
    }

    fn start_inner(dir: &Path, tls: Option<TlsFiles<'_>>) -> Mosquitto {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let mut text = format!(
            "allow_anonymous true\npersistence false\nmax_queued_messages 100000\nmessage_size_limit 0\nlistener {port} 127.0.0.1\n"
        );
        let tls_port = tls.map(|files| {
            let tls_port = free_port();
            text.push_str(&format!(
                "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate false\n",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            ));
            tls_port
        });
        std::fs::write(&conf, text).unwrap();
        let child = Self::spawn(&conf);
        let m = Mosquitto { child, port, tls_port, conf };
        m.wait_listening();
        m
    }

    fn spawn(conf: &Path) -> Child {
        Command::new(mosquitto_bin())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto")
    }

    fn wait_listening(&self) {
        for port in std::iter::once(self.port).chain(self.tls_port) {
            let listening = (0..200).any(|_| {
                let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
                if !up {
                    std::thread::sleep(Duration::from_millis(20));
                }
                up
            });
            assert!(listening, "mosquitto did not listen on {port} (config {})", self.conf.display());
        }
    }

    /// Stops and starts it again on the same port (a broker restart).
    pub fn restart(&mut self, down_for: Duration) {
        self.kill();
        std::thread::sleep(down_for);
        self.start_again();
    }

    /// Kills it (a broker crash); [`Mosquitto::start_again`] brings it back on the same port.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again after [`Mosquitto::kill`], and waits until it listens.
    pub fn start_again(&mut self) {
        self.child = Self::spawn(&self.conf);
        self.wait_listening();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker for a story and the `[mqtt]` config section that points the daemon at it.
pub struct Broker {
    pub kind: BrokerKind,
    pub port: u16,
    pub mosquitto: Option<Mosquitto>,
}

impl Broker {
    pub fn start(kind: BrokerKind, dir: &Path) -> Broker {
        match kind {
            BrokerKind::Embedded => Broker { kind, port: free_port(), mosquitto: None },
            BrokerKind::Mosquitto => {
                let m = Mosquitto::start(dir);
                Broker { kind, port: m.port, mosquitto: Some(m) }
            }
        }
    }

    pub fn config_section(&self) -> String {
        match self.kind {
            BrokerKind::Embedded => format!("[mqtt]\nembedded_listen = \"127.0.0.1:{}\"\n", self.port),
            BrokerKind::Mosquitto => format!("[mqtt]\nbroker = \"mqtt://127.0.0.1:{}\"\n", self.port),
        }
    }
}

/// A test client with its event loop polled in a task; received publishes come out of `rx`.
pub struct TestClient {
    pub client: AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl TestClient {
    pub async fn connect(port: u16, id: &str, subscribe: &[&str]) -> TestClient {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_max_packet_size(32 * 1024 * 1024, 32 * 1024 * 1024);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let topics = subscribe.iter().map(|t| t.to_string()).collect();
        let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
        tokio::spawn(pump(eventloop, topics, tx, subscribed_tx));
        // The broker acknowledged every subscription: what is published from now on is heard.
        if !subscribe.is_empty() {
            let acked = tokio::time::timeout(Duration::from_secs(30), subscribed.wait_for(|s| *s)).await;
            assert!(matches!(acked, Ok(Ok(_))), "{id}: the broker on {port} did not acknowledge {subscribe:?}");
        }
        TestClient { client, rx }
    }

    /// Waits for a message on `topic` whose payload satisfies `pred`.
    pub async fn wait_for(&mut self, topic: &str, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((t, p))) if t == topic && pred(&p) => return p,
                Ok(Some(_)) => continue,
                _ => panic!("no message on {topic} within {timeout:?}"),
            }
        }
    }
}

/// Polls the client's event loop; subscribes on every connection (so a client kept across a
/// broker restart keeps hearing), ahead of anything queued.
async fn pump(
    mut eventloop: EventLoop,
    topics: Vec<String>,
    tx: tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>,
    subscribed: tokio::sync::watch::Sender<bool>,
) {
    let mut acked = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                acked = 0;
                for topic in topics.iter().rev() {
                    eventloop.pending.push_front(Request::Subscribe(Subscribe::new(topic.clone(), QoS::AtLeastOnce)));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                acked += 1;
                if acked == topics.len() {
                    subscribed.send_replace(true);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send((p.topic, p.payload.to_vec())).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A loopback TCP relay in front of a broker: it forwards both ways until told to hold what
/// clients send (the broker then neither gets nor acknowledges it) or to cut every connection,
/// which plays a session dropping with publishes in flight, while the broker and its other
/// clients run on.
pub struct Relay {
    pub port: u16,
    held: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, c) = (held.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let task = tokio::spawn(relay(client, upstream, h.subscribe()));
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay { port, held, connections, accept }
    }

    /// From now on what clients send waits in their sockets.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Closes every connection (both sides), then forwards again for new ones.
    pub fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        self.held.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

async fn relay(
    mut client: tokio::net::TcpStream,
    upstream: u16,
    mut held: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut broker = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    let (mut from_client, mut to_client) = client.split();
    let (mut from_broker, mut to_broker) = broker.split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // What the client sent while held (a read can complete as the hold begins): never
    // forwarded unless the hold ends.
    let mut stash: Vec<u8> = Vec::new();
    loop {
        let hold = *held.borrow_and_update();
        if !hold && !stash.is_empty() {
            to_broker.write_all(&stash).await?;
            stash.clear();
        }
        tokio::select! {
            n = from_client.read(&mut up), if !hold => match n? {
                0 => return Ok(()),
                n if *held.borrow() => stash.extend_from_slice(&up[..n]),
                n => to_broker.write_all(&up[..n]).await?,
            },
            n = from_broker.read(&mut down) => match n? {
                0 => return Ok(()),
                n => to_client.write_all(&down[..n]).await?,
            },
            changed = held.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}
