//! A lane's simulated devices attached to a running store: the plain scanner, the framed
//! scale and the framed lane display on their ptys, with the handshakes done.

use std::time::Duration;

use device_sim::{FramedSim, PlainScannerSim, Port, Suffix};
use firmware_proto as fp;

use crate::store::StoreFixture;

const HELLO_WAIT: Duration = Duration::from_secs(20);

pub struct LaneDevices {
    pub scanner: PlainScannerSim,
    pub scale: FramedSim,
    pub display: FramedSim,
}

/// Opens `lane`'s device ptys of `store` (the daemon running) and waits until the hub has
/// greeted the framed devices; `aim` is the scanner's symbology prefix, if it sends one.
pub async fn attach(store: &StoreFixture, lane: &str, aim: Option<&'static str>) -> LaneDevices {
    let scanner = PlainScannerSim::new(Port::pty(&store.device_path(lane, "scanner")).unwrap(), Suffix::Cr, aim);
    let mut scale = FramedSim::new(
        Port::pty(&store.device_path(lane, "scale")).unwrap(),
        &format!("{lane}-scale"),
        fp::DeviceKind::Scale,
    );
    let mut display = FramedSim::new(
        Port::pty(&store.device_path(lane, "display")).unwrap(),
        &format!("{lane}-display"),
        fp::DeviceKind::Lane,
    );
    assert!(matches!(scale.hello(HELLO_WAIT).await.unwrap(), fp::Body::HelloAck(_)));
    assert!(matches!(display.hello(HELLO_WAIT).await.unwrap(), fp::Body::HelloAck(_)));
    // The plain scanner has no handshake: give the hub a moment to open its port.
    tokio::time::sleep(Duration::from_millis(300)).await;
    LaneDevices { scanner, scale, display }
}
