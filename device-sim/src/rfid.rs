//! A simulated RFID reader on MQTT speaking the native envelope: it publishes batches of tag
//! reads (`TagReads` on `dev/rfid/{id}/evt`), with duplicates on demand, reports buffer
//! overflows (`ReaderStatus`) as a real reader does when the hub falls behind, and runs
//! inventory cycles (`InventoryCycle` start, the reads, end) for zone counts. [`sgtin96`]
//! makes the tags' EPCs for any GTIN.

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

    /// Starts (`ended: false`) or ends an inventory cycle over `antennas` (empty: all).
    pub async fn cycle(&mut self, cycle_id: u32, ended: bool, antennas: &[u8]) -> Result<(), String> {
        let antennas = heapless::Vec::from_slice(antennas).map_err(|_| "more than 16 antennas".to_owned())?;
        self.send(fp::Body::InventoryCycle(fp::InventoryCycle { cycle_id, ended, antennas })).await
    }

    /// One whole inventory cycle on `antenna`: its start, every EPC read `repeat` times, its end.
    pub async fn count_cycle(
        &mut self,
        cycle_id: u32,
        epcs: &[Vec<u8>],
        antenna: u8,
        repeat: usize,
    ) -> Result<(), String> {
        self.cycle(cycle_id, false, &[antenna]).await?;
        self.read(epcs, antenna, repeat).await?;
        self.cycle(cycle_id, true, &[antenna]).await
    }

    /// Reports reads dropped in the reader's buffer.
    pub async fn overflow(&mut self, dropped: u32) -> Result<(), String> {
        self.send(fp::Body::ReaderStatus(fp::ReaderStatus { overflow: dropped, temperature_c: Some(41) })).await
    }
}

/// The SGTIN-96 EPC (filter 1, point-of-sale item) of a GTIN given as 8 to 14 digits whose GS1
/// company prefix has `company_digits` digits (6 to 12), with this serial (38 bits).
pub fn sgtin96(gtin: &str, company_digits: usize, serial: u64) -> Result<Vec<u8>, String> {
    // (partition, company prefix bits, item reference bits) by company prefix digits 12..=6.
    const PARTITIONS: [(u128, u32, u32); 7] =
        [(0, 40, 4), (1, 37, 7), (2, 34, 10), (3, 30, 14), (4, 27, 17), (5, 24, 20), (6, 20, 24)];
    if !(8..=14).contains(&gtin.len()) || !gtin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("GTIN {gtin:?} is not 8 to 14 digits"));
    }
    if !(6..=12).contains(&company_digits) {
        return Err(format!("a GS1 company prefix has 6 to 12 digits, not {company_digits}"));
    }
    if serial >= 1 << 38 {
        return Err(format!("serial {serial} does not fit 38 bits"));
    }
    let digits = format!("{gtin:0>14}");
    let (partition, company_bits, item_bits) = PARTITIONS[12 - company_digits];
    let parse = |s: &str| s.parse::<u128>().map_err(|e| format!("GTIN {gtin}: {e}"));
    let company = parse(&digits[1..1 + company_digits])?;
    // The item reference: the indicator digit, then the digits after the company prefix, without
    // the check digit.
    let item = parse(&format!("{}{}", &digits[..1], &digits[1 + company_digits..13]))?;
    let value: u128 = (0x30 << 88)
        | (1 << 85)
        | (partition << 82)
        | (company << (82 - company_bits))
        | (item << (82 - company_bits - item_bits))
        | u128::from(serial);
    Ok(value.to_be_bytes()[4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgtin96_matches_the_tag_data_standard_example() {
        // TDS: urn:epc:tag:sgtin-96:3.0614141.812345.6789 (GTIN 80614141123458) is
        // 3074257BF7194E4000001A85; with filter 1 instead of 3 the second byte is 0x34.
        let epc = sgtin96("80614141123458", 7, 6789).unwrap();
        let hex: String = epc.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(hex, "3034257BF7194E4000001A85");
        assert!(sgtin96("4006381333931", 7, 1).is_ok());
        assert!(sgtin96("40063813339x1", 7, 1).is_err());
        assert!(sgtin96("4006381333931", 5, 1).is_err());
        assert!(sgtin96("4006381333931", 7, 1 << 38).is_err());
    }
}
