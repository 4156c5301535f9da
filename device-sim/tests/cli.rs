//! The `device-sim` binary as a technician runs it: it refuses to guess where to attach, and a
//! plain scanner writes its codes, with the configured suffix, to the pty the hub would open.

use std::process::Command;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;

#[test]
fn refuses_without_a_place_to_attach() {
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim")).args(["scanner", "4006381333931"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --pty LINK or --port PATH"), "{out:?}");
}

#[test]
fn a_bad_broker_address_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim")).args(["rfid", "--broker", "tcp://x"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not mqtt://host:port"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_scanner_writes_its_codes_to_the_pty() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("usb-Sim_Scanner-if00");
    let mut sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "scanner",
            "--suffix",
            "crlf",
            "--aim",
            "]E0",
            "--start-delay-ms",
            "1500",
            "--interval-ms",
            "50",
            "--pty",
        ])
        .arg(&link)
        .arg("4006381333931")
        .spawn()
        .unwrap();
    // Open the device as the hub would, once its by-id link appears.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !link.exists() {
        assert!(std::time::Instant::now() < deadline, "device-sim never created {}", link.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut port = tokio_serial::new(link.to_string_lossy(), 9600).open_native_async().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), port.read(&mut buf)).await.unwrap().unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"]E04006381333931\r\n");
    assert!(sim.wait().await.unwrap().success());
}
