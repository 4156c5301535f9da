//! Story: a store's ledger is appending sales as fast as it can when the power goes, again and
//! again. After every restart each acknowledged sale is there exactly once, nothing that was
//! not acknowledged is half there, the stock projection equals the sum of the events, and
//! `storectl ledger verify` passes.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use e2e_tests::{workspace_bin, Running};
use edge_agent::ledger::{EventBody, LedgerReader};
use rand::{Rng, SeedableRng};
use shared::Sku;

const ROUNDS: usize = 6;

#[test]
fn sigkill_during_sales_loses_nothing_acknowledged_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = rand::random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // index -> seq of every sale acknowledged in any round
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut from = 0u64;

    for round in 0..ROUNDS {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ledger-load"));
        cmd.arg(dir.path()).arg(from.to_string()).arg("16");
        let run = Running::spawn(cmd, false);
        run.wait_for("READY", Duration::from_secs(30));
        // Kill after a random number of acknowledgements, plus a random few milliseconds.
        let kill_after = rng.gen_range(1..2_000);
        let mut lines = Vec::new();
        while lines.len() < kill_after {
            match run.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => lines.push(line),
                Err(e) => panic!("round {round}: loader stopped acknowledging: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..20)));
        let mut child = run.child;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Whatever it printed before dying was acknowledged too.
        lines.extend(run.lines.try_iter());

        let mut replays = 0;
        for line in &lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let ["ACK", i, seq, replayed] = parts[..] else { panic!("unexpected loader line {line:?}") };
            let (i, seq): (u64, u64) = (i.parse().unwrap(), seq.parse().unwrap());
            if replayed == "true" {
                replays += 1;
                // Durable in an earlier round; known unless the loader died between commit and print.
                let first = *acked.entry(i).or_insert(seq);
                assert_eq!(first, seq, "replay of sale {i} must return its first result");
            } else {
                assert!(acked.insert(i, seq).is_none(), "sale {i} was applied twice");
            }
        }
        check_ledger(&dir, &acked, round);
        // Restart a little before the highest acknowledged index, so some sales are retried.
        from = acked.keys().next_back().map_or(0, |max| max.saturating_sub(40));
        eprintln!("round {round}: {} acks ({replays} replays), {} sales acknowledged so far", lines.len(), acked.len());
    }

    let out = Command::new(workspace_bin("storectl"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["ledger", "verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "storectl ledger verify: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ledger OK"));
}

fn check_ledger(dir: &tempfile::TempDir, acked: &BTreeMap<u64, u64>, round: usize) {
    let reader = LedgerReader::open(dir.path()).unwrap();
    if let Err(broken) = reader.verify().unwrap() {
        panic!("round {round}: ledger verify failed: {broken}");
    }
    for (i, seq) in acked {
        match reader.event_by_key(&format!("sale:{i}")).unwrap() {
            Some((found, EventBody::Sale { .. })) => {
                assert_eq!(found, *seq, "round {round}: sale {i} moved")
            }
            other => panic!("round {round}: acknowledged sale {i} is missing: {other:?}"),
        }
    }
    // Stock must equal receipts minus every sale in the log, acknowledged or not: a sale is
    // either wholly in (event and stock) or wholly absent.
    let conn = rusqlite::Connection::open_with_flags(
        edge_agent::ledger::Ledger::path_in(dir.path()),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn.prepare("SELECT idem_key FROM events WHERE kind = 'sale'").unwrap();
    let keys: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    let mut sold = [0i64; 10];
    for k in &keys {
        let i: u64 = k.strip_prefix("sale:").unwrap().parse().unwrap();
        sold[(i % 10) as usize] += 1;
        if i % 7 == 0 {
            sold[((i + 1) % 10) as usize] += 1;
        }
    }
    for (s, sold) in sold.iter().enumerate() {
        let on_hand = reader.stock(&Sku::new(format!("SKU{s}")).unwrap()).unwrap().on_hand;
        assert_eq!(on_hand, 1_000_000 - sold, "round {round}: stock of SKU{s} disagrees with the events");
    }
}
