//! Prometheus metrics on a local address (`[metrics] listen`): the ledger writer, online pickup
//! orders, cloud sync, labels, MQTT devices and RFID reads, in the text exposition format. Rendering is a pure
//! function of a snapshot (tested without I/O); the server answers `GET /metrics` and nothing
//! else, one request per connection.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::Control;
use crate::ledger::WriterStats;
use crate::mqtt::MqttSnapshot;
use crate::sync::SyncStatus;

/// Everything one scrape shows, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub store: String,
    pub writer: WriterStats,
    pub queue_depth: usize,
    pub outbox_rows: Option<u64>,
    pub sync: Option<SyncStatus>,
    pub labels_mismatched: Option<usize>,
    pub mqtt: Option<MqttSnapshot>,
    pub broker_connected: Option<bool>,
    pub labels: Option<crate::labels::runtime::LabelsView>,
    pub now_ms: u64,
}

fn metric<L: AsRef<str>>(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(L, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{} {value}", labels.as_ref());
    }
}

/// One sample per value of `label`, each also labelled with the store.
fn by_label(store: &str, label: &str, values: &[(&str, u64)]) -> Vec<(String, f64)> {
    values.iter().map(|(v, n)| (format!("{{store=\"{store}\",{label}=\"{v}\"}}"), *n as f64)).collect()
}

/// The exposition text of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let store = format!("{{store=\"{}\"}}", s.store);
    let one = |v: f64| [(store.as_str(), v)];
    let w = &s.writer;
    metric(
        &mut out,
        "edge_ledger_batches_total",
        "counter",
        "Ledger transactions committed (one fsync each).",
        &one(w.batches as f64),
    );
    metric(
        &mut out,
        "edge_ledger_commands_total",
        "counter",
        "Commands answered by the ledger writer.",
        &one(w.commands as f64),
    );
    metric(
        &mut out,
        "edge_ledger_events_total",
        "counter",
        "New events appended to the ledger.",
        &one(w.events as f64),
    );
    metric(
        &mut out,
        "edge_ledger_failed_batches_total",
        "counter",
        "Ledger batches that failed (nothing applied).",
        &one(w.failed_batches as f64),
    );
    metric(
        &mut out,
        "edge_ledger_busy_seconds_total",
        "counter",
        "Time the writer spent applying and committing batches (divide by batches for the mean duration).",
        &one(w.busy_micros as f64 / 1e6),
    );
    metric(
        &mut out,
        "edge_ledger_commit_seconds_total",
        "counter",
        "Of the writer's busy time, the time spent in successful commits (writing the WAL and waiting for the disk's fsync); a slow disk shows here.",
        &one(w.commit_micros as f64 / 1e6),
    );
    // The batch-duration histogram (cumulative buckets, as Prometheus wants them).
    let _ =
        writeln!(out, "# HELP edge_ledger_batch_seconds Time to apply and commit one ledger batch (with its fsync).");
    let _ = writeln!(out, "# TYPE edge_ledger_batch_seconds histogram");
    let mut cumulative = 0u64;
    for (i, n) in w.batch_buckets.iter().enumerate() {
        cumulative += n;
        let le = crate::ledger::writer::BATCH_BUCKETS_MICROS
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |b| format!("{}", *b as f64 / 1e6));
        let _ = writeln!(out, "edge_ledger_batch_seconds_bucket{{store=\"{}\",le=\"{le}\"}} {cumulative}", s.store);
    }
    let _ = writeln!(out, "edge_ledger_batch_seconds_sum{store} {}", w.busy_micros as f64 / 1e6);
    let _ = writeln!(out, "edge_ledger_batch_seconds_count{store} {cumulative}");
    metric(
        &mut out,
        "edge_ledger_queue_depth",
        "gauge",
        "Commands waiting for the ledger writer.",
        &one(s.queue_depth as f64),
    );
    metric(
        &mut out,
        "edge_online_orders_at_risk",
        "gauge",
        "Online pickup orders whose units the store does not have on hand (after sales, counts, adjustments, merges or new reservations).",
        &one(w.orders_at_risk as f64),
    );
    metric(
        &mut out,
        "edge_online_shortage_alerts_total",
        "counter",
        "Shortage alerts raised: a commit left more pickup orders of a SKU without cover.",
        &one(w.shortage_alerts as f64),
    );
    metric(
        &mut out,
        "edge_online_grants_total",
        "counter",
        "Grants of stock to the online channel made by the top-up policy.",
        &one(w.online_grants as f64),
    );
    metric(
        &mut out,
        "edge_online_handovers_total",
        "counter",
        "Online pickup orders handed over to customers.",
        &one(w.handovers as f64),
    );
    if let Some(rows) = s.outbox_rows {
        metric(
            &mut out,
            "edge_sync_outbox_rows",
            "gauge",
            "Own changes the cloud has not acknowledged.",
            &one(rows as f64),
        );
    }
    if let Some(sync) = &s.sync {
        let lag = sync.last_success_ms.map(|t| s.now_ms.saturating_sub(t) as f64 / 1e3).unwrap_or(-1.0);
        metric(
            &mut out,
            "edge_sync_seconds_since_success",
            "gauge",
            "Seconds since the last successful sync (-1: never).",
            &one(lag),
        );
        metric(
            &mut out,
            "edge_sync_consecutive_failures",
            "gauge",
            "Sync sessions failed in a row.",
            &one(sync.consecutive_failures as f64),
        );
        metric(&mut out, "edge_sync_sessions_total", "counter", "Sync sessions attempted.", &one(sync.sessions as f64));
        metric(
            &mut out,
            "edge_sync_pushed_rows_total",
            "counter",
            "Rows pushed to the cloud.",
            &one(sync.pushed_rows as f64),
        );
        metric(&mut out, "edge_sync_pulled_rows_total", "counter", "Cloud rows merged.", &one(sync.pulled_rows as f64));
        metric(
            &mut out,
            "edge_sync_refused_rows_total",
            "counter",
            "Cloud rows refused by this store.",
            &one(sync.refused_rows as f64),
        );
        metric(
            &mut out,
            "edge_sync_page_rows",
            "gauge",
            "Rows per sync page in use: [cloud] page_rows, or fewer for an hour after the cloud refused pages as too large.",
            &one(f64::from(sync.page_rows)),
        );
        metric(
            &mut out,
            "edge_sync_pages_too_large_total",
            "counter",
            "Sync pages the cloud refused as too large (HTTP 413; raise its server.max_body_bytes or lower [cloud] page_rows).",
            &one(sync.pages_too_large as f64),
        );
    }
    if let Some(n) = s.labels_mismatched {
        metric(
            &mut out,
            "edge_labels_mismatched",
            "gauge",
            "Shelf labels not showing what they should.",
            &one(n as f64),
        );
    }
    if let Some(l) = &s.labels {
        let st = &l.stages;
        let stages = by_label(
            &s.store,
            "stage",
            &[
                ("up_to_date", st.up_to_date as u64),
                ("pending", st.pending as u64),
                ("in_flight", st.in_flight as u64),
                ("failed", st.failed as u64),
                ("expired", st.expired as u64),
            ],
        );
        metric(&mut out, "edge_labels", "gauge", "Shelf labels by stage of their latest content.", &stages);
    }
    if let Some(up) = s.broker_connected {
        metric(
            &mut out,
            "edge_mqtt_connected",
            "gauge",
            "1 when the hub's MQTT connection is up.",
            &one(f64::from(u8::from(up))),
        );
    }
    if let Some(m) = &s.mqtt {
        let online = m.devices.iter().filter(|(_, d)| d.online).count();
        let offline = m.devices.len() - online;
        let by_state = by_label(
            &s.store,
            "state",
            &[("online", online as u64), ("offline", offline as u64), ("quarantined", m.quarantined.len() as u64)],
        );
        metric(&mut out, "edge_devices", "gauge", "MQTT devices by state.", &by_state);
        let st = &m.stats;
        metric(&mut out, "edge_mqtt_accepted_total", "counter", "Device messages accepted.", &one(st.accepted as f64));
        let refused = by_label(
            &s.store,
            "reason",
            &[
                ("topic", st.refused_topic),
                ("oversized", st.refused_oversized),
                ("payload", st.refused_payload),
                ("quarantined", st.quarantined),
                ("impinj", st.impinj_refused),
            ],
        );
        metric(&mut out, "edge_mqtt_refused_total", "counter", "Device messages refused, by reason.", &refused);
        metric(&mut out, "edge_rfid_tag_reads_total", "counter", "RFID tag reads received.", &one(st.tag_reads as f64));
        metric(
            &mut out,
            "edge_rfid_reader_overflows_total",
            "counter",
            "RFID reader buffer overflows reported.",
            &one(st.reader_overflows as f64),
        );
        metric(
            &mut out,
            "edge_rfid_exit_alarms_total",
            "counter",
            "Exit-gate alarms raised.",
            &one(st.exit_alarms as f64),
        );
        metric(
            &mut out,
            "edge_label_inputs_dropped_total",
            "counter",
            "Label acks and check-ins dropped while the label task was behind.",
            &one(st.label_inputs_dropped as f64),
        );
    }
    out
}

async fn snapshot(control: &Control) -> Snapshot {
    let dir = control.data_dir.clone();
    let outbox = tokio::task::spawn_blocking(move || {
        crate::ledger::LedgerReader::open(&dir).and_then(|r| r.outbox_depth()).ok()
    })
    .await
    .ok()
    .flatten();
    Snapshot {
        store: control.store.to_string(),
        writer: control.ledger.stats(),
        queue_depth: control.ledger.queue_depth(),
        outbox_rows: outbox,
        sync: control.sync.as_ref().map(|s| s.status.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        labels_mismatched: control.mismatches.as_ref().map(|m| m.lock().map(|l| l.len()).unwrap_or(0)),
        mqtt: control.mqtt.as_ref().map(|m| m.board.lock().map(|s| s.clone()).unwrap_or_default()),
        broker_connected: control.mqtt.as_ref().map(|m| *m.connected.borrow()),
        labels: control
            .mqtt
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .map(|l| l.board.lock().map(|v| v.clone()).unwrap_or_default()),
        now_ms: crate::labels::runtime::wall_ms(),
    }
}

/// Binds `listen` and serves `GET /metrics` until `stop` (call inside the runtime).
pub fn start(
    control: Control,
    listen: SocketAddr,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(listen)?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "Metrics listening");
    let stop = stop.clone();
    tasks.spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let control = control.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
                    ("200 OK", render(&snapshot(&control).await))
                } else {
                    ("404 Not Found", "only GET /metrics is served here\n".to_owned())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format_with_help_and_type() {
        let mut s = Snapshot { store: "s1".into(), queue_depth: 3, outbox_rows: Some(7), ..Snapshot::default() };
        s.writer.events = 42;
        s.writer.batch_buckets[0] = 3;
        s.writer.batch_buckets[2] = 1;
        s.writer.busy_micros = 1_500;
        s.writer.commit_micros = 1_250;
        s.labels_mismatched = Some(2);
        s.sync = Some(SyncStatus {
            page_rows: 250,
            configured_page_rows: 1_000,
            pages_too_large: 2,
            ..SyncStatus::default()
        });
        s.writer.orders_at_risk = 2;
        s.writer.shortage_alerts = 1;
        let text = render(&s);
        assert!(text.contains("# TYPE edge_online_orders_at_risk gauge\nedge_online_orders_at_risk{store=\"s1\"} 2\n"));
        assert!(text.contains("edge_online_shortage_alerts_total{store=\"s1\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE edge_ledger_events_total counter\nedge_ledger_events_total{store=\"s1\"} 42\n"));
        assert!(text.contains("edge_ledger_queue_depth{store=\"s1\"} 3\n"));
        assert!(text.contains("edge_ledger_commit_seconds_total{store=\"s1\"} 0.00125\n"), "{text}");
        assert!(text.contains("edge_ledger_batch_seconds_bucket{store=\"s1\",le=\"0.00025\"} 3\n"), "{text}");
        assert!(text.contains("edge_ledger_batch_seconds_bucket{store=\"s1\",le=\"0.001\"} 4\n"), "{text}");
        assert!(text.contains("edge_ledger_batch_seconds_bucket{store=\"s1\",le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("edge_ledger_batch_seconds_count{store=\"s1\"} 4\n"), "{text}");
        assert!(text.contains("edge_sync_outbox_rows{store=\"s1\"} 7\n"));
        assert!(text.contains("# TYPE edge_sync_page_rows gauge\nedge_sync_page_rows{store=\"s1\"} 250\n"), "{text}");
        assert!(text.contains("edge_sync_pages_too_large_total{store=\"s1\"} 2\n"), "{text}");
        assert!(text.contains("edge_labels_mismatched{store=\"s1\"} 2\n"));
        assert!(!text.contains("edge_devices"), "no MQTT section without MQTT");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("edge_") && value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
