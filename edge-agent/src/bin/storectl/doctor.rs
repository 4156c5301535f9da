//! `storectl doctor`: what a field technician checks first on a store PC, each with a verdict
//! and a hint: the ledger file, free disk, the daemon, the clock against the cloud, the
//! broker, the serial ports. Reads only; never changes anything.

use std::path::Path;
use std::time::Duration;

use edge_agent::config::Config;
use edge_agent::control::client::call;
use edge_agent::control::protocol::Cmd as ControlCmd;
use edge_agent::ledger::LedgerReader;
use serde::Serialize;
use serde_json::json;

use super::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    verdict: Verdict,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

fn check(check: &'static str, verdict: Verdict, detail: impl Into<String>, hint: Option<&str>) -> Check {
    Check { check, verdict, detail: detail.into(), hint: hint.map(str::to_owned) }
}

pub fn run(json: bool, config: Option<&Path>, data_dir: &Path, socket: &Path) -> Result<(), Failure> {
    let config = config.map(Config::load).transpose().map_err(|e| Failure::Usage(e.to_string()))?;
    let mut checks = ledger_checks(data_dir);
    checks.push(disk(data_dir));
    checks.push(daemon(socket));
    match &config {
        Some(c) => {
            checks.push(clock(c));
            checks.push(broker(c));
            checks.extend(serial_ports(c));
        }
        None => checks.push(check(
            "configuration",
            Verdict::Skip,
            "no --config given: clock, broker and serial checks skipped",
            Some("run `storectl doctor --config /etc/edge-agent/config.toml`"),
        )),
    }
    if json {
        println!("{}", json!({ "checks": checks }));
    } else {
        for c in &checks {
            let verdict = match c.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "WARN",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            println!("{:<16} {:<5} {}", c.check, verdict, c.detail);
            if let Some(h) = &c.hint {
                println!("{:<22} hint: {h}", "");
            }
        }
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        Err(Failure::Unhealthy)
    } else {
        Ok(())
    }
}

fn ledger_checks(data_dir: &Path) -> Vec<Check> {
    let reader = match LedgerReader::open(data_dir) {
        Ok(r) => r,
        Err(e) => {
            return vec![check(
            "ledger file",
            Verdict::Fail,
            e.to_string(),
            Some("restore the ledger from the last `storectl backup`, or move it aside and let the daemon start fresh"),
        )]
        }
    };
    let integrity = match reader.integrity_check() {
        Ok(Ok(())) => check("ledger file", Verdict::Ok, "SQLite integrity check passed", None),
        Ok(Err(problem)) => check(
            "ledger file",
            Verdict::Fail,
            format!("SQLite integrity check: {problem}"),
            Some("stop the daemon, restore the last `storectl backup`; keep the damaged file for analysis"),
        ),
        Err(e) => check("ledger file", Verdict::Fail, e.to_string(), None),
    };
    let chain = match reader.verify() {
        Ok(Ok(report)) => {
            check("ledger chain", Verdict::Ok, format!("{} events, hash chain intact", report.events), None)
        }
        Ok(Err(broken)) => check(
            "ledger chain",
            Verdict::Fail,
            broken.to_string(),
            Some("the ledger was changed outside edge-agent: report it; `storectl ledger export` keeps the evidence"),
        ),
        Err(e) => check("ledger chain", Verdict::Fail, e.to_string(), None),
    };
    vec![integrity, chain]
}

// statvfs field widths differ between platforms; the casts are no-ops only on 64-bit Linux.
#[allow(clippy::unnecessary_cast)]
fn disk(data_dir: &Path) -> Check {
    let Some(path) = std::ffi::CString::new(data_dir.as_os_str().as_encoded_bytes()).ok() else {
        return check("free disk", Verdict::Skip, "the data folder path cannot be passed to statvfs", None);
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let (rc, st) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return check("free disk", Verdict::Warn, format!("cannot read: {}", std::io::Error::last_os_error()), None);
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let total = (st.f_blocks as u64 * st.f_frsize as u64).max(1);
    let pct = free * 100 / total;
    let detail = format!("{} MiB free ({pct}%) in {}", free >> 20, data_dir.display());
    let hint = Some("free space: old journal files (`journalctl --vacuum-size=200M`), old backups");
    if free < 256 << 20 {
        check("free disk", Verdict::Fail, detail, hint)
    } else if free < 1 << 30 || pct < 10 {
        check("free disk", Verdict::Warn, detail, hint)
    } else {
        check("free disk", Verdict::Ok, detail, None)
    }
}

fn daemon(socket: &Path) -> Check {
    match call(socket, ControlCmd::Status, Duration::from_secs(5)) {
        Ok(status) => check("daemon", Verdict::Ok, format!("running, up {} s", status["uptime_s"]), None),
        Err(e) => check(
            "daemon",
            Verdict::Warn,
            e.to_string(),
            Some("`systemctl start edge-agent`, then `journalctl -u edge-agent -e` for why it stopped"),
        ),
    }
}

fn clock(config: &Config) -> Check {
    let Some(cloud) = &config.cloud else {
        return check("clock", Verdict::Skip, "no [cloud] configured to compare with", None);
    };
    let url = format!("{}/healthz", cloud.url.trim_end_matches('/'));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return check("clock", Verdict::Warn, e.to_string(), None),
    };
    let answer = runtime.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
        let sent = now_secs();
        let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
        let date = resp.headers().get("date").and_then(|d| d.to_str().ok()).map(str::to_owned);
        Ok::<_, String>((sent, now_secs(), date))
    });
    match answer {
        Err(e) => check(
            "clock",
            Verdict::Warn,
            format!("cannot reach the cloud at {url}: {e}"),
            Some("check the store's internet link; sales go on offline and sync later"),
        ),
        Ok((_, _, None)) => check("clock", Verdict::Warn, "the cloud's answer has no Date header", None),
        Ok((sent, received, Some(date))) => match parse_http_date(&date) {
            None => check("clock", Verdict::Warn, format!("unreadable Date header {date:?}"), None),
            Some(cloud_secs) => {
                let local = (sent + received) / 2;
                let skew = local as i64 - cloud_secs as i64;
                let fence = (config.clock.max_skew_ms / 1000) as i64;
                let detail =
                    format!("this PC is {skew:+} s from the cloud (the cloud refuses stamps over {fence} s ahead)");
                let hint = Some("check NTP (`timedatectl`) and the RTC battery");
                if skew.abs() > fence {
                    check("clock", Verdict::Fail, detail, hint)
                } else if skew.abs() > 5 {
                    check("clock", Verdict::Warn, detail, hint)
                } else {
                    check("clock", Verdict::Ok, detail, None)
                }
            }
        },
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Parses an HTTP date (`Mon, 23 Nov 2026 03:58:08 GMT`) into Unix seconds.
fn parse_http_date(text: &str) -> Option<u64> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else { return None };
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = months.iter().position(|m| m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<u64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else { return None };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days).ok().map(|d| d * 86_400 + h * 3600 + m * 60 + s)
}

fn broker(config: &Config) -> Check {
    let Some(m) = &config.mqtt else {
        return check("broker", Verdict::Skip, "no [mqtt] configured", None);
    };
    let (host, port) = match m.broker_address() {
        Ok(a) => a,
        Err(e) => return check("broker", Verdict::Fail, e, None),
    };
    let embedded = m.broker.is_none();
    let target = format!("{host}:{port}");
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&target)
        .ok()
        .and_then(|mut a| a.next())
        .map(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)));
    match reachable {
        Some(Ok(_)) => check("broker", Verdict::Ok, format!("{target} answers"), None),
        Some(Err(e)) if embedded => check(
            "broker",
            Verdict::Warn,
            format!("embedded broker {target}: {e}"),
            Some("the embedded broker runs inside edge-agent: start the daemon"),
        ),
        Some(Err(e)) => check(
            "broker",
            Verdict::Fail,
            format!("{target}: {e}"),
            Some("`systemctl status mosquitto`; check the address in [mqtt] broker"),
        ),
        None => check("broker", Verdict::Fail, format!("cannot resolve {target}"), None),
    }
}

fn serial_ports(config: &Config) -> Vec<Check> {
    if config.serial.is_empty() {
        return vec![check("serial ports", Verdict::Skip, "no [[serial]] devices configured", None)];
    }
    config
        .serial
        .iter()
        .map(|dev| {
            if dev.path.exists() {
                check("serial port", Verdict::Ok, format!("{} at {}", dev.id, dev.path.display()), None)
            } else {
                check(
                    "serial port",
                    Verdict::Warn,
                    format!("{} not present at {}", dev.id, dev.path.display()),
                    Some("plug the device in (check the cable); `ls /dev/serial/by-id/` shows the right path"),
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_http_date;

    #[test]
    fn http_dates_parse_to_unix_seconds() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Mon, 23 Nov 2026 03:58:08 GMT"), Some(1_795_406_288));
        assert_eq!(parse_http_date("Sun, 29 Feb 2004 12:00:00 GMT"), Some(1_078_056_000));
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_http_date("Mon, 23 Foo 2026 03:58:08 GMT"), None);
    }
}
