//! Story: someone edits the ledger file with the sqlite3 shell to hide a sale. `storectl
//! ledger verify` fails and names the first event that no longer checks out.

use std::path::Path;
use std::process::Command;

use e2e_tests::{tool, workspace_bin};
use edge_agent::ledger::{Command as LedgerCommand, IdempotencyKey, Ledger, LedgerOptions, SaleLine, Tender};
use shared::{Currency, Money, Sku, StoreId};

fn ledger_with_ten_sales(dir: &Path) {
    let eur = Currency::new("EUR").unwrap();
    let (h, w) =
        Ledger::open(dir, &LedgerOptions::new(StoreId::new("s1").unwrap(), eur)).unwrap().start_writer(16).unwrap();
    for i in 1..=10 {
        let sale = LedgerCommand::Sale {
            lines: vec![SaleLine {
                sku: Sku::new(format!("SKU{}", i % 3)).unwrap(),
                quantity: 1,
                line_total: Money::new(100, eur),
                price: None,
            }],
            tender: Tender::Cash,
        };
        h.blocking_submit(IdempotencyKey::new(format!("sale:{i}")).unwrap(), sale).unwrap();
    }
    drop(h);
    w.join();
}

/// Runs `storectl ledger verify`; returns (exit code, stderr, stdout of --json).
fn verify(dir: &Path) -> (i32, String, serde_json::Value) {
    let human =
        Command::new(workspace_bin("storectl")).arg("--data-dir").arg(dir).args(["ledger", "verify"]).output().unwrap();
    let json = Command::new(workspace_bin("storectl"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--json", "ledger", "verify"])
        .output()
        .unwrap();
    assert_eq!(human.status.code(), json.status.code());
    (
        human.status.code().unwrap(),
        String::from_utf8_lossy(&human.stderr).into_owned(),
        serde_json::from_slice(&json.stdout).expect("--json prints JSON"),
    )
}

fn tamper(sqlite3: &Path, dir: &Path, sql: &str) {
    let out = Command::new(sqlite3).arg(Ledger::path_in(dir)).arg(sql).output().unwrap();
    assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn verify_names_the_first_changed_deleted_or_reordered_event() {
    let Some(sqlite3) = tool("sqlite3") else {
        return;
    };
    let cases = [
        ("changed", "UPDATE events SET body = X'0100' WHERE seq = 4", 4, "content does not match its hash"),
        ("changed key", "UPDATE events SET idem_key = 'sale:x' WHERE seq = 6", 6, "content does not match its hash"),
        ("deleted", "DELETE FROM events WHERE seq = 5", 5, "expected sequence number 5, found 6"),
        ("deleted tail", "DELETE FROM events WHERE seq = 10", 10, "events were removed from the end"),
        (
            "reordered",
            "UPDATE events SET seq = -3 WHERE seq = 3; UPDATE events SET seq = 3 WHERE seq = 7; UPDATE events SET seq = 7 WHERE seq = -3;",
            3,
            "does not match the hash of event 2",
        ),
    ];
    for (what, sql, bad_seq, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        ledger_with_ten_sales(dir.path());
        let (code, _, json) = verify(dir.path());
        assert_eq!((code, &json["ok"]), (0, &serde_json::Value::Bool(true)), "{what}: intact ledger must verify");

        tamper(&sqlite3, dir.path(), sql);
        let (code, stderr, json) = verify(dir.path());
        assert_eq!(code, 1, "{what}: verify must fail");
        assert!(stderr.contains(&format!("event {bad_seq}:")) && stderr.contains(reason), "{what}: {stderr}");
        assert_eq!(json["first_bad_seq"], bad_seq, "{what}: {json}");
    }
}

#[test]
fn verify_catches_a_stock_projection_edited_behind_the_log() {
    let Some(sqlite3) = tool("sqlite3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    ledger_with_ten_sales(dir.path());
    tamper(&sqlite3, dir.path(), "UPDATE stock_slots SET dec = dec - 1 WHERE sku = 'SKU1'");
    let (code, stderr, json) = verify(dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("stock projection of SKU1"), "{stderr}");
    assert!(json["first_bad_seq"].is_null());
}
