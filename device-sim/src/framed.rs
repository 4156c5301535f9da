//! A framed `firmware-proto` device (scanner, scale or lane display): says HELLO, sends its
//! messages and waits for the hub's acks (re-sending like real firmware), acknowledges what
//! the hub sends it and keeps the lane display updates for the test to read.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use firmware_proto as fp;

use crate::port::Port;

pub struct FramedSim {
    pub port: Port,
    pub name: String,
    pub kind: fp::DeviceKind,
    pub firmware: String,
    /// Override the HELLO's schema hash (to simulate old firmware).
    pub schema_hash: u32,
    pub boot_id: u32,
    seq: u32,
    acc: fp::Accumulator,
    /// Hub messages received and not yet taken (display updates, handshake answers).
    pub inbox: VecDeque<fp::Body>,
    acked: Vec<u32>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl FramedSim {
    pub fn new(port: Port, name: &str, kind: fp::DeviceKind) -> FramedSim {
        FramedSim {
            port,
            name: name.to_owned(),
            kind,
            firmware: "sim-1.0.0".into(),
            schema_hash: fp::SCHEMA_HASH,
            boot_id: rand::random(),
            seq: 0,
            acc: fp::Accumulator::new(),
            inbox: VecDeque::new(),
            acked: Vec::new(),
        }
    }

    /// A reboot: new boot id, sequence from 1 again.
    pub fn reboot(&mut self) {
        self.boot_id = rand::random();
        self.seq = 0;
        self.acc = fp::Accumulator::new();
    }

    fn envelope(&mut self, body: fp::Body) -> io::Result<fp::Envelope> {
        self.seq += 1;
        fp::Envelope::new(&self.name, self.boot_id, self.seq, body).map_err(other)
    }

    async fn write_env(&mut self, env: &fp::Envelope) -> io::Result<()> {
        let bytes = fp::frame::encode_vec(env).map_err(other)?;
        self.port.write(&bytes).await
    }

    /// Reads and handles what the hub sent for up to `wait`: acks hub messages that need it,
    /// records acks of ours, queues the rest in `inbox`.
    pub async fn pump(&mut self, wait: Duration) -> io::Result<()> {
        let bytes = self.port.read(wait).await?;
        let mut decoded = Vec::new();
        self.acc.feed(&bytes, |r| decoded.push(r));
        for env in decoded.into_iter().flatten() {
            match env.body {
                fp::Body::Ack(a) => {
                    // Only recent acks matter (a send waits for its own); keep the list bounded.
                    if self.acked.len() >= 1024 {
                        self.acked.drain(..512);
                    }
                    self.acked.push(a.of_seq)
                }
                body => {
                    if body.needs_ack() {
                        let ack = self.envelope(fp::Body::Ack(fp::Ack { of_seq: env.seq }))?;
                        self.write_env(&ack).await?;
                    }
                    if self.inbox.len() >= 65_536 {
                        self.inbox.pop_front(); // a test that never reads its display
                    }
                    self.inbox.push_back(body);
                }
            }
        }
        Ok(())
    }

    /// Says HELLO until the hub answers (re-sent every 300 ms, as firmware does at boot).
    pub async fn hello(&mut self, timeout: Duration) -> io::Result<fp::Body> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let hello = fp::Hello {
                kind: self.kind,
                firmware: fp::truncated_str(&self.firmware),
                protocol_version: fp::PROTOCOL_VERSION,
                schema_hash: self.schema_hash,
            };
            let env = self.envelope(fp::Body::Hello(hello))?;
            // The port may not be open on the hub side yet: a write to a pty nobody reads is fine.
            let _ = self.write_env(&env).await;
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                self.pump(Duration::from_millis(50)).await?;
                if let Some(pos) =
                    self.inbox.iter().position(|b| matches!(b, fp::Body::HelloAck(_) | fp::Body::HelloRefused(_)))
                {
                    return Ok(self.inbox.remove(pos).expect("position is in range"));
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "hub did not answer HELLO"))
    }

    /// Sends a message and waits for its ack, re-sending every 300 ms.
    pub async fn send(&mut self, body: fp::Body) -> io::Result<()> {
        let env = self.envelope(body)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            self.write_env(&env).await?;
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                self.pump(Duration::from_millis(30)).await?;
                if self.acked.contains(&env.seq) {
                    return Ok(());
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "hub did not ack"))
    }

    /// Sends once without waiting for the ack (which `pump` records when it comes).
    pub async fn send_nowait(&mut self, body: fp::Body) -> io::Result<u32> {
        let env = self.envelope(body)?;
        self.write_env(&env).await?;
        Ok(env.seq)
    }

    /// Sends the same envelope twice (an ack lost on the way back): the hub must act once.
    pub async fn send_duplicated(&mut self, body: fp::Body) -> io::Result<()> {
        let env = self.envelope(body)?;
        self.write_env(&env).await?;
        self.write_env(&env).await?;
        self.pump(Duration::from_millis(100)).await
    }

    /// The first half of a frame, with no terminator: the hub must discard it at the next 0x00.
    pub async fn send_truncated(&mut self, body: fp::Body) -> io::Result<()> {
        let env = self.envelope(body)?;
        let bytes = fp::frame::encode_vec(&env).map_err(other)?;
        self.port.write(&bytes[..bytes.len() / 2]).await
    }

    pub async fn garbage(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.port.write(bytes).await
    }

    pub async fn scan(&mut self, code: &str) -> io::Result<()> {
        self.send(fp::Body::Scan(fp::Scan::new("", code.as_bytes()).map_err(other)?)).await
    }

    /// A weight as a real scale reports it: some readings in motion, then the stable one.
    pub async fn weigh(&mut self, grams: i32, motion_readings: u32) -> io::Result<()> {
        for i in 0..motion_readings {
            let wobble = grams + (i as i32 % 3 - 1) * 7;
            self.send(fp::Body::Weight(fp::Weight {
                grams: wobble,
                stable: false,
                under_zero: false,
                over_capacity: false,
            }))
            .await?;
        }
        self.send(fp::Body::Weight(fp::Weight { grams, stable: true, under_zero: false, over_capacity: false })).await
    }

    pub async fn input(&mut self, input: fp::LaneInput) -> io::Result<()> {
        self.send(fp::Body::LaneInput(input)).await
    }

    /// Waits until a display update matching `pred` arrives; returns every update seen up to
    /// and including it.
    pub async fn wait_display(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&fp::LaneDisplay) -> bool,
    ) -> io::Result<Vec<fp::LaneDisplay>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            while let Some(body) = self.inbox.pop_front() {
                if let fp::Body::LaneDisplay(d) = body {
                    let hit = pred(&d);
                    seen.push(d);
                    if hit {
                        return Ok(seen);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("display update not seen; saw {seen:?}")));
            }
            self.pump(Duration::from_millis(30)).await?;
        }
    }
}
