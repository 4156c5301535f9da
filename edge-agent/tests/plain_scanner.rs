//! A plain-mode scanner session over an in-memory link: codes reach the lane once, garbage
//! does not, and a scanner that wants ACK/NAK gets them.

use std::time::Duration;

use edge_agent::devices::plain_scanner::{PlainConfig, Suffix};
use edge_agent::devices::plain_task::{run, PlainScannerSettings};
use edge_agent::devices::serial::{LinkEvent, SerialLink};
use edge_agent::lane::LaneInput;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

async fn recv<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap()
}

#[tokio::test]
async fn codes_reach_the_lane_and_the_scanner_hears_ack_or_nak() {
    let (event_tx, events) = mpsc::channel(16);
    let (writes, mut written) = mpsc::channel(16);
    let (lane_tx, mut lane) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let settings = PlainScannerSettings {
        device_id: "scanner-1".into(),
        parser: PlainConfig { suffix: Suffix::Crlf, gap_ms: 50 },
        ack_nak: true,
        double_read_window_ms: 300,
    };
    let task = tokio::spawn(run(SerialLink { events, writes }, settings, lane_tx, stop.clone()));

    event_tx.send(LinkEvent::Connected).await.unwrap();
    event_tx.send(LinkEvent::Bytes(b"]E0400638133".to_vec())).await.unwrap();
    event_tx.send(LinkEvent::Bytes(b"3931\r\n".to_vec())).await.unwrap();
    assert_eq!(recv(&mut lane).await, LaneInput::Scan { data: b"4006381333931".to_vec() });
    assert_eq!(recv(&mut written).await, vec![0x06]);

    event_tx.send(LinkEvent::Bytes(b"\x02\x03bad\r\n".to_vec())).await.unwrap();
    assert_eq!(recv(&mut written).await, vec![0x15], "garbage is answered with NAK");

    // The scanner re-sends after the NAK; a double read inside the window is acked, not sold twice.
    event_tx.send(LinkEvent::Bytes(b"96385074\r\n96385074\r\n".to_vec())).await.unwrap();
    assert_eq!(recv(&mut lane).await, LaneInput::Scan { data: b"96385074".to_vec() });
    assert_eq!(recv(&mut written).await, vec![0x06]);
    assert_eq!(recv(&mut written).await, vec![0x06]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), lane.recv()).await.is_err(),
        "the double read was dropped"
    );

    // A partial code cut off by the gap is dropped with a NAK, and the link carries on.
    event_tx.send(LinkEvent::Bytes(b"4006".to_vec())).await.unwrap();
    assert_eq!(recv(&mut written).await, vec![0x15]);
    stop.cancel();
    task.await.unwrap();
}
