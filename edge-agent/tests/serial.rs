//! Serial links over pty pairs: the link finds its device by a by-id style path, survives an
//! unplug (the pty master closing) without spinning, and reconnects when the path reappears.

use std::path::Path;
use std::time::Duration;

use edge_agent::devices::serial::{spawn, LinkEvent, SerialSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Plugs a "device" in: a pty pair whose slave is reachable at `link`. Returns the master end.
fn plug(link: &Path) -> SerialStream {
    let (master, slave) = SerialStream::pair().expect("pty pair");
    let slave_path = slave.name().expect("pty slave has a name");
    drop(slave);
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(slave_path, link).unwrap();
    master
}

async fn next(events: &mut tokio::sync::mpsc::Receiver<LinkEvent>) -> LinkEvent {
    tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("link event in time").expect("link alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_and_replug_are_survived() {
    let dir = tempfile::tempdir().unwrap();
    let by_id = dir.path().join("usb-Acme_Scanner_1234-if00");
    let mut master = plug(&by_id);
    let stop = CancellationToken::new();
    let mut link = spawn(
        SerialSettings {
            device_id: "scanner-1".into(),
            path: by_id.clone(),
            baud: 9600,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
        },
        &TaskTracker::new(),
        stop.clone(),
    );
    assert_eq!(next(&mut link.events).await, LinkEvent::Connected);
    master.write_all(b"96385074\r").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 9 {
        match next(&mut link.events).await {
            LinkEvent::Bytes(b) => got.extend(b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"96385074\r");
    link.writes.send(b"\x06".to_vec()).await.unwrap();
    let mut ack = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), master.read_exact(&mut ack)).await.unwrap().unwrap();
    assert_eq!(ack, [0x06]);

    // Unplug: the device disappears and its by-id link with it.
    drop(master);
    std::fs::remove_file(&by_id).unwrap();
    assert!(matches!(next(&mut link.events).await, LinkEvent::Disconnected { .. }));
    // While it is away the link waits quietly: no event, no spinning on Ok(0).
    assert!(tokio::time::timeout(Duration::from_millis(300), link.events.recv()).await.is_err());

    // Replug (a new pty: a new /dev/pts node behind the same by-id name).
    let mut master = plug(&by_id);
    assert_eq!(next(&mut link.events).await, LinkEvent::Connected);
    master.write_all(b"]E04006381333931\r").await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r") {
        if let LinkEvent::Bytes(b) = next(&mut link.events).await {
            got.extend(b);
        }
    }
    assert_eq!(got, b"]E04006381333931\r");
    stop.cancel();
}
