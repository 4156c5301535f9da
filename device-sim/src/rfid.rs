//! A simulated RFID reader on MQTT speaking the native envelope: it publishes batches of tag
//! reads (`TagReads` on `dev/rfid/{id}/evt`), with duplicates on demand, and reports buffer
//! overflows (`ReaderStatus`) as a real reader does when the hub falls behind.

use std::time::Duration;

use firmware_proto as fp;
use rumqttc::{AsyncClient, MqttOptions, QoS};

pub struct RfidReader {
    client: AsyncClient,
    store: String,
    pub name: String,
    boot: u32,
    seq: u32,
}

impl RfidReader {
    pub fn connect(host: &str, port: u16, store: &str, name: &str) -> RfidReader {
        let mut opts = MqttOptions::new(format!("{name}-{}", rand::random::<u32>()), host, port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        RfidReader { client, store: store.to_owned(), name: name.to_owned(), boot: rand::random(), seq: 0 }
    }

    async fn send(&mut self, body: fp::Body) -> Result<(), String> {
        self.seq += 1;
        let env = fp::Envelope::new(&self.name, self.boot, self.seq, body).map_err(|e| e.to_string())?;
        let bytes = fp::payload::encode_vec(&env).map_err(|e| e.to_string())?;
        let topic = format!("se/v1/{}/dev/rfid/{}/evt", self.store, self.name);
        self.client.publish(topic, QoS::AtLeastOnce, false, bytes).await.map_err(|e| e.to_string())
    }

    /// One batch of reads of these EPCs on `antenna`, each read `repeat` times (duplicates).
    pub async fn read(&mut self, epcs: &[Vec<u8>], antenna: u8, repeat: usize) -> Result<(), String> {
        let mut reads: heapless::Vec<fp::TagRead, 16> = heapless::Vec::new();
        for epc in epcs {
            for _ in 0..repeat.max(1) {
                let read = fp::TagRead {
                    epc: heapless::Vec::from_slice(epc).map_err(|_| "EPC longer than 32 bytes".to_owned())?,
                    antenna,
                    rssi_cdbm: -5500,
                    count: 1,
                };
                if reads.push(read.clone()).is_err() {
                    self.send(fp::Body::TagReads(fp::TagReads { reads: std::mem::take(&mut reads) })).await?;
                    let _ = reads.push(read);
                }
            }
        }
        if !reads.is_empty() {
            self.send(fp::Body::TagReads(fp::TagReads { reads })).await?;
        }
        Ok(())
    }

    /// Reports reads dropped in the reader's buffer.
    pub async fn overflow(&mut self, dropped: u32) -> Result<(), String> {
        self.send(fp::Body::ReaderStatus(fp::ReaderStatus { overflow: dropped, temperature_c: Some(41) })).await
    }
}
