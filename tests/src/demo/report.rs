//! The demo's closing summary: per store, its sales, its stock and prices against the cloud's,
//! its shelf labels and its sync lag; and what disagreed, which makes the demo exit 1.

use super::money;

/// One store's line of the summary.
#[derive(Debug, Clone)]
pub struct StoreSummary {
    pub store: String,
    pub sales: usize,
    pub takings_minor: i64,
    /// (SKU, on hand in the store, on hand as the cloud holds it).
    pub stock: Vec<(String, i64, Option<i64>)>,
    /// SKUs whose price in effect differs between the store and the cloud.
    pub price_differences: Vec<String>,
    pub labels_current: usize,
    pub labels: usize,
    /// Rows the store has not pushed yet.
    pub outbox_rows: u64,
    /// `GET /v1/hq/stores`: the store's versions the cloud has not received, the cloud's rows
    /// the store has not pulled, seconds since the cloud heard from it.
    pub push_lag_versions: Option<u64>,
    pub pending_rows: Option<u64>,
    pub seconds_since_seen: Option<u64>,
}

impl StoreSummary {
    pub fn stock_agrees(&self) -> bool {
        self.stock.iter().all(|(_, store, cloud)| Some(*store) == *cloud)
    }

    pub fn lag_is_zero(&self) -> bool {
        self.outbox_rows == 0 && self.push_lag_versions == Some(0) && self.pending_rows == Some(0)
    }

    /// What disagrees, in words; empty when this store and the cloud agree and every label shows
    /// its price.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (sku, store, cloud) in &self.stock {
            if Some(*store) != *cloud {
                let cloud = cloud.map_or("nothing".to_owned(), |c| c.to_string());
                out.push(format!("{}: {sku} on hand is {store} in the store but {cloud} in the cloud", self.store));
            }
        }
        for sku in &self.price_differences {
            out.push(format!("{}: the price of {sku} differs between the store and the cloud", self.store));
        }
        if self.labels_current != self.labels {
            out.push(format!(
                "{}: {} of {} shelf labels do not show the current price",
                self.store,
                self.labels - self.labels_current,
                self.labels
            ));
        }
        if !self.lag_is_zero() {
            out.push(format!("{}: sync is not caught up ({})", self.store, self.lag_text()));
        }
        out
    }

    fn lag_text(&self) -> String {
        let n = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        format!(
            "{} to push, {} to pull, seen {} s ago",
            self.outbox_rows.max(self.push_lag_versions.unwrap_or(0)),
            n(self.pending_rows),
            n(self.seconds_since_seen)
        )
    }
}

const COLUMNS: [(&str, usize); 6] =
    [("store", 6), ("sales", 6), ("takings", 11), ("stock", 7), ("prices", 7), ("labels", 7)];

/// The summary table's header line (the CI test looks for it).
pub fn header(skus: &[&str]) -> String {
    let mut line = String::new();
    for (name, width) in &COLUMNS[..3] {
        line.push_str(&format!("{name:<width$}"));
    }
    for sku in skus {
        line.push_str(&format!("{:<13}", format!("{sku} s/c")));
    }
    for (name, width) in &COLUMNS[3..] {
        line.push_str(&format!("{name:<width$}"));
    }
    line.push_str("sync lag");
    line
}

/// The table: one line per store; `s/c` columns are on hand in the store / in the cloud.
pub fn table(summaries: &[StoreSummary]) -> Vec<String> {
    let skus: Vec<&str> =
        summaries.first().map(|s| s.stock.iter().map(|(k, _, _)| k.as_str()).collect()).unwrap_or_default();
    let mut lines = vec![header(&skus)];
    for s in summaries {
        let mut line = format!("{:<6}{:<6}{:<11}", s.store, s.sales, money(s.takings_minor));
        for (_, store, cloud) in &s.stock {
            let cloud = cloud.map_or("-".to_owned(), |c| c.to_string());
            let mark = if cloud == store.to_string() { "" } else { " !" };
            line.push_str(&format!("{:<13}", format!("{store}/{cloud}{mark}")));
        }
        let word = |ok: bool| if ok { "agree" } else { "differ" };
        line.push_str(&format!("{:<7}", word(s.stock_agrees())));
        line.push_str(&format!("{:<7}", word(s.price_differences.is_empty())));
        line.push_str(&format!("{:<7}", format!("{}/{}", s.labels_current, s.labels)));
        line.push_str(&s.lag_text());
        lines.push(line);
    }
    lines
}
