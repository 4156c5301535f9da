//! The service's HTTP API as stores and HQ see it: the real router on a loopback port chosen by
//! the OS, on a temporary SQLite database, driven by a minimal HTTP/1.1 client written here (so
//! the tests control every byte, down to a 100 MB body streamed in chunks).

use std::net::SocketAddr;
use std::time::Duration;

use cloud_sync::auth::Token;
use cloud_sync::config::Config;
use cloud_sync::http::{self, Settings};
use cloud_sync::storage::sqlite::SqliteStorage;
use cloud_sync::storage::Storage;
use serde_json::{json, Value};
use shared::orders::{pickup_code_digest, OrderLine};
use shared::sync::{Cursor, Push, Rows, SlotGroup, SlotValue, SyncRequest, SyncResponse};
use shared::{wire, ActorId, CatalogField, EscrowKey, EscrowRow, HlcStamp, OrderHeader, OrderId, Sku, StoreId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Harness

struct Cloud {
    addr: SocketAddr,
    storage: SqliteStorage,
    admin: String,
    s1: String,
    s2: String,
    _dir: tempfile::TempDir,
}

fn store(id: &str) -> StoreId {
    StoreId::new(id).unwrap()
}

fn sku(id: &str) -> Sku {
    Sku::new(id).unwrap()
}

/// A cloud with stores s1 and s2 and an HQ admin, serving the default settings.
async fn start() -> Cloud {
    let dir = tempfile::tempdir().unwrap();
    let storage = SqliteStorage::open(&dir.path().join("cloud.db")).unwrap();
    storage.migrate().await.unwrap();
    let (admin, s1, s2) = (Token::generate(), Token::generate(), Token::generate());
    storage.add_admin("hq", admin.sha256(), 1).await.unwrap();
    storage.add_store(&store("s1"), s1.sha256(), 1).await.unwrap();
    storage.add_store(&store("s2"), s2.sha256(), 1).await.unwrap();
    let config =
        Config::parse("[storage]\nbackend = \"sqlite\"\npath = \"unused\"\n", std::path::Path::new("t.toml")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = http::router(storage.clone(), Settings::from_config(&config));
    tokio::spawn(http::serve(listener, router, std::future::pending()));
    Cloud {
        addr,
        storage,
        admin: admin.reveal().to_owned(),
        s1: s1.reveal().to_owned(),
        s2: s2.reveal().to_owned(),
        _dir: dir,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses a whole HTTP/1.1 response (the connection was closed after it).
fn parse_reply(raw: &[u8]) -> Reply {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no complete response head in {:?}", String::from_utf8_lossy(raw));
    });
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned())).collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked =
        headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = out;
    }
    Reply { status, headers, body }
}

async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    parse_reply(&raw)
}

impl Cloud {
    async fn get(&self, path: &str, token: &str) -> Reply {
        request(self.addr, "GET", path, &[("Authorization", &format!("Bearer {token}"))], b"").await
    }

    async fn send_json(&self, method: &str, path: &str, token: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {token}");
        let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
        request(self.addr, method, path, &headers, body.to_string().as_bytes()).await
    }

    async fn send_bytes(&self, store: &str, token: &str, body: &[u8]) -> Reply {
        let auth = format!("Bearer {token}");
        let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/x-postcard")];
        request(self.addr, "POST", &format!("/v1/stores/{store}/sync"), &headers, body).await
    }

    async fn sync(&self, store: &str, token: &str, req: &SyncRequest) -> Reply {
        self.send_bytes(store, token, &wire::encode(req).unwrap()).await
    }

    async fn events(&self) -> Vec<Value> {
        let reply = self.get("/v1/hq/security-events?limit=100", &self.admin).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()["events"].as_array().unwrap().clone()
    }

    async fn put_price(&self, body: Value) -> Reply {
        self.send_json("PUT", "/v1/hq/prices", &self.admin, &body).await
    }

    async fn transfer(&self, body: &Value) -> Reply {
        self.send_json("POST", "/v1/hq/transfers", &self.admin, body).await
    }

    async fn import(&self, content_type: &str, body: &str) -> Reply {
        let auth = format!("Bearer {}", self.admin);
        let headers = [("Authorization", auth.as_str()), ("Content-Type", content_type)];
        request(self.addr, "POST", "/v1/hq/catalog", &headers, body.as_bytes()).await
    }
}

fn now_ms() -> u64 {
    http::now_ms()
}

/// A sync request from `store_id` pushing `groups` as versions (0, 3].
fn sync_request(store_id: &str, groups: Vec<SlotGroup>, cursor: Cursor) -> SyncRequest {
    let s = store(store_id);
    SyncRequest {
        store: s.clone(),
        sent_at: HlcStamp { wall_ms: now_ms(), logical: 0, actor: ActorId::for_store(&s) },
        head_version: 3,
        push: Some(Push { from_version: 0, to_version: 3, rows: Rows { stock: groups, ..Rows::default() } }),
        cursor,
        max_rows: 1000,
        include_own_slots: false,
    }
}

fn own_slots(store_id: &str, slots: &[(&str, u64, u64)]) -> SlotGroup {
    let s = store(store_id);
    SlotGroup {
        store: s.clone(),
        actor: ActorId::for_store(&s),
        slots: slots.iter().map(|(k, inc, dec)| SlotValue { sku: sku(k), inc: *inc, dec: *dec }).collect(),
    }
}

fn decode(reply: &Reply) -> SyncResponse {
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/x-postcard"));
    wire::decode(&reply.body).unwrap()
}

fn has_event(events: &[Value], kind: &str, store_id: &str) -> bool {
    events.iter().any(|e| e["kind"] == kind && e["store"] == store_id)
}

// ---------------------------------------------------------------------------------------------
// Store sync

#[tokio::test]
async fn a_store_pushes_its_rows_then_pulls_what_hq_wrote_for_it() {
    let cloud = start().await;
    let first = decode(
        &cloud
            .sync("s1", &cloud.s1, &sync_request("s1", vec![own_slots("s1", &[("MILK", 10, 3)])], Cursor::default()))
            .await,
    );
    assert_eq!(first.acked_version, 3);
    assert_eq!(first.cloud_time.actor, ActorId::cloud());
    assert!(first.cloud_time.wall_ms > 0);

    // HQ writes a chain price and moves 5 units from s2 to s1.
    let price = json!({"sku":"MILK","scope":"chain","slot":"regular","amount":"1.29","currency":"EUR"});
    let reply = cloud.put_price(price).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["stamp"]["actor"], "cloud");
    let transfer = json!({"id":"T-1","from":"s2","to":"s1","sku":"MILK","quantity":5});
    let reply = cloud.send_json("POST", "/v1/hq/transfers", &cloud.admin, &transfer).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // The next exchange (nothing to push) brings exactly that: the price and s1's cloud slot.
    let mut next = sync_request("s1", vec![], first.next_cursor);
    next.push = None;
    let second = decode(&cloud.sync("s1", &cloud.s1, &next).await);
    assert_eq!(second.acked_version, 3, "the acknowledged version stands");
    assert_eq!(second.rows.prices.len(), 1);
    let milk = &second.rows.prices[0];
    assert_eq!(milk.value.as_ref().unwrap().amount.minor, 129);
    let slots: Vec<_> = second.rows.slot_rows().collect();
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert_eq!((slots[0].key.store.as_str(), slots[0].key.actor.as_str()), ("s1", "cloud"));
    assert_eq!((slots[0].slot.inc, slots[0].slot.dec), (5, 0));
    assert!(!second.more);

    // HQ sees the chain's stock and s1's sync position.
    let stock = cloud.get("/v1/hq/stock/MILK", &cloud.admin).await.json();
    let value_of =
        |s: &str| stock["stores"].as_array().unwrap().iter().find(|v| v["store"] == s).unwrap()["value"].clone();
    assert_eq!(value_of("s1"), json!(12));
    assert_eq!(value_of("s2"), json!(-5));
    assert_eq!(stock["chain_total"], json!(7));
    let stores = cloud.get("/v1/hq/stores", &cloud.admin).await.json();
    let s1 = stores["stores"].as_array().unwrap().iter().find(|s| s["store"] == "s1").unwrap().clone();
    assert_eq!(s1["acked_version"], 3);
    assert_eq!(s1["push_lag_versions"], 0);
    assert!(s1["seconds_since_seen"].as_u64().is_some(), "{s1}");
    let s2 = stores["stores"].as_array().unwrap().iter().find(|s| s["store"] == "s2").unwrap().clone();
    assert_eq!(s2["seconds_since_seen"], Value::Null);

    // A retried exchange is harmless.
    let again = decode(
        &cloud
            .sync("s1", &cloud.s1, &sync_request("s1", vec![own_slots("s1", &[("MILK", 10, 3)])], Cursor::default()))
            .await,
    );
    assert_eq!(again.acked_version, 3);
    let stock = cloud.get("/v1/hq/stock/MILK", &cloud.admin).await.json();
    assert_eq!(stock["chain_total"], json!(7));
}

/// A store whose ledger was lost syncs from a new ledger, which writes as a new actor of the
/// store: its pulls leave out only what it wrote itself, so the old ledger's slots come back
/// to it; the old ledger's own pull still leaves its slots out. A request sent as another
/// store's actor is refused and recorded.
#[tokio::test]
async fn a_new_ledger_of_a_store_pulls_the_old_ledgers_slots_but_not_its_own() {
    let cloud = start().await;
    let s1 = store("s1");
    decode(
        &cloud
            .sync("s1", &cloud.s1, &sync_request("s1", vec![own_slots("s1", &[("MILK", 50, 10)])], Cursor::default()))
            .await,
    );

    let new_ledger = ActorId::for_store_ledger(&s1, "9c1e").unwrap();
    let mut sold = sync_request("s1", vec![own_slots("s1", &[("MILK", 0, 5)])], Cursor::default());
    sold.push.as_mut().unwrap().rows.stock[0].actor = new_ledger.clone();
    sold.sent_at.actor = new_ledger.clone();
    let answer = decode(&cloud.sync("s1", &cloud.s1, &sold).await);
    let pulled: Vec<_> = answer.rows.slot_rows().map(|r| (r.key.actor.to_string(), r.slot.inc, r.slot.dec)).collect();
    assert_eq!(pulled, vec![("store:s1".to_string(), 50, 10)], "the old ledger's slot, not the new one's");
    let stock = cloud.get("/v1/hq/stock/MILK", &cloud.admin).await.json();
    assert_eq!(stock["chain_total"], json!(35));

    let mut old = sync_request("s1", vec![], Cursor::default());
    old.push = None;
    let answer = decode(&cloud.sync("s1", &cloud.s1, &old).await);
    let pulled: Vec<_> = answer.rows.slot_rows().map(|r| r.key.actor.to_string()).collect();
    assert_eq!(pulled, vec![new_ledger.to_string()], "the old ledger gets the new one's slot only");

    let mut foreign = sync_request("s1", vec![], Cursor::default());
    foreign.push = None;
    foreign.sent_at.actor = ActorId::for_store_ledger(&store("s2"), "9c1e").unwrap();
    let reply = cloud.sync("s1", &cloud.s1, &foreign).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.text().contains("store:s2:9c1e"), "{}", reply.text());
    assert!(has_event(&cloud.events().await, "ownership", "s1"));
}

#[tokio::test]
async fn credentials_are_checked_and_refusals_recorded() {
    let cloud = start().await;
    let req = wire::encode(&sync_request("s1", vec![], Cursor::default())).unwrap();
    let none = request(cloud.addr, "POST", "/v1/stores/s1/sync", &[], &req).await;
    assert_eq!(none.status, 401, "{}", none.text());
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert_eq!(none.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(none.text().lines().count(), 1);
    let wrong = cloud.send_bytes("s1", Token::generate().reveal(), &req).await;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    let other = cloud.send_bytes("s1", &cloud.s2, &req).await;
    assert_eq!(other.status, 403, "{}", other.text());
    assert!(other.text().contains("store s2"), "{}", other.text());
    let admin = cloud.send_bytes("s1", &cloud.admin, &req).await;
    assert_eq!(admin.status, 403, "{}", admin.text());

    // The HQ API takes admin tokens only.
    let store_on_hq = cloud.get("/v1/hq/stores", &cloud.s1).await;
    assert_eq!(store_on_hq.status, 403, "{}", store_on_hq.text());
    assert!(store_on_hq.json()["error"].as_str().unwrap().contains("s1"));
    let nobody = request(cloud.addr, "GET", "/v1/hq/stores", &[], b"").await;
    assert_eq!(nobody.status, 401);

    let events = cloud.events().await;
    assert!(has_event(&events, "bad_token", "s1"), "{events:?}");
    assert!(has_event(&events, "wrong_store", "s2"), "{events:?}");
    assert!(has_event(&events, "store_token_on_hq", "s1"), "{events:?}");
    assert!(events.iter().filter(|e| e["kind"] == "bad_token").count() >= 3, "{events:?}");

    let health = request(cloud.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));
    let unknown = request(cloud.addr, "GET", "/v2/nothing", &[], b"").await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test]
async fn a_push_touching_another_stores_slot_is_refused_recorded_and_not_merged() {
    let cloud = start().await;
    let foreign = sync_request(
        "s1",
        vec![own_slots("s1", &[("MILK", 1, 0)]), own_slots("s2", &[("MILK", 0, 100), ("BREAD", 0, 100)])],
        Cursor::default(),
    );
    let reply = cloud.sync("s1", &cloud.s1, &foreign).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.text().contains("store:s2"), "{}", reply.text());
    let events = cloud.events().await;
    assert!(has_event(&events, "ownership", "s1"), "{events:?}");
    let stores = cloud.storage.stores().await.unwrap();
    let s1 = stores.iter().find(|s| s.store == store("s1")).unwrap();
    assert_eq!(s1.refused_rows, 3);
    assert_eq!(s1.acked_version, 0);
    assert!(cloud.storage.stock_of_sku(&sku("MILK")).await.unwrap().is_empty(), "nothing merged");

    // A request whose body names another store is an ownership refusal too.
    let reply = cloud.sync("s1", &cloud.s1, &sync_request("s2", vec![], Cursor::default())).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    // A malformed push is a plain refusal: 400, not a security event.
    let mut backwards = sync_request("s1", vec![], Cursor::default());
    backwards.push.as_mut().unwrap().from_version = 9;
    let reply = cloud.sync("s1", &cloud.s1, &backwards).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("backwards"), "{}", reply.text());
}

#[tokio::test]
async fn an_unknown_protocol_version_is_refused_naming_both_versions() {
    let cloud = start().await;
    let mut bytes =
        wire::encode(&sync_request("s1", vec![own_slots("s1", &[("MILK", 1, 0)])], Cursor::default())).unwrap();
    bytes[2..4].copy_from_slice(&7u16.to_le_bytes());
    let reply = cloud.send_bytes("s1", &cloud.s1, &bytes).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    let text = reply.text();
    let ours = format!("version {}", shared::SYNC_PROTOCOL_VERSION);
    assert!(text.contains("version 7") && text.contains(&ours), "{text}");
    let garbage = cloud.send_bytes("s1", &cloud.s1, b"SE\x01\x00\xff\xff\xff").await;
    assert_eq!(garbage.status, 400, "{}", garbage.text());
    assert!(cloud.storage.stock_of_sku(&sku("MILK")).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_stamp_a_day_ahead_is_refused_naming_the_skew() {
    let cloud = start().await;
    let mut req = sync_request("s1", vec![own_slots("s1", &[("MILK", 1, 0)])], Cursor::default());
    req.sent_at.wall_ms = now_ms() + 86_400_000;
    let reply = cloud.sync("s1", &cloud.s1, &req).await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.text().contains("ahead") && reply.text().contains("skew fence is 300000 ms"), "{}", reply.text());
    let s1 = cloud.storage.stores().await.unwrap().into_iter().find(|s| s.store == store("s1")).unwrap();
    assert_eq!(s1.refused_rows, 1);
    assert!(cloud.storage.stock_of_sku(&sku("MILK")).await.unwrap().is_empty());
}

/// Writes `total` bytes of body in chunked encoding, 1 MiB a chunk, until the server stops
/// taking them; returns how many body bytes were written.
async fn stream_body(mut w: tokio::net::tcp::OwnedWriteHalf, total: usize) -> usize {
    let chunk = vec![0x5a_u8; 1 << 20];
    let mut sent = 0;
    while sent < total {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        if w.write_all(&framed).await.is_err() {
            return sent;
        }
        sent += chunk.len();
    }
    let _ = w.write_all(b"0\r\n\r\n").await;
    sent
}

#[tokio::test]
async fn a_100_mb_body_is_refused_with_413_without_being_read() {
    let cloud = start().await;
    const TOTAL: usize = 100 << 20;
    // Streamed without a length: refused as soon as it crosses the limit.
    let conn = TcpStream::connect(cloud.addr).await.unwrap();
    let (mut r, mut w) = conn.into_split();
    let head = format!(
        "POST /v1/stores/s1/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/x-postcard\r\nTransfer-Encoding: chunked\r\n\r\n",
        cloud.s1
    );
    w.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(stream_body(w, TOTAL));
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "the server never answered");
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(reply.text().contains("33554432 bytes"), "{}", reply.text());
    let sent = writer.await.unwrap();
    assert!(sent < TOTAL, "the server took the whole body ({sent} bytes) instead of closing the connection");

    // Declared up front: refused before a single body byte is read.
    let conn = TcpStream::connect(cloud.addr).await.unwrap();
    let (mut r, mut w) = conn.into_split();
    let head = format!(
        "POST /v1/stores/s1/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {TOTAL}\r\n\r\n",
        cloud.s1
    );
    w.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut raw)).await.unwrap().unwrap();
    assert_eq!(parse_reply(&raw).status, 413);
}

// ---------------------------------------------------------------------------------------------
// HQ API

const HEADER: &str = "sku,name,gtins,unit,tax_class,discontinued\r\n";

#[tokio::test]
async fn a_catalog_file_with_bad_lines_applies_nothing_then_a_good_one_applies() {
    let cloud = start().await;
    let bad = format!(
        "{HEADER}MILK,\"Milk, whole\",4006381333931,piece,reduced,false\r\nEGG,Egg,4006381333932,piece,reduced,false\r\nCHEESE,Cheese,,litre,standard,\r\n"
    );
    let reply = cloud.import("text/csv", &bad).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    let errors = reply.json()["errors"].as_array().unwrap().clone();
    let lines: Vec<(u64, &str)> =
        errors.iter().map(|e| (e["line"].as_u64().unwrap(), e["field"].as_str().unwrap())).collect();
    assert_eq!(lines, vec![(3, "gtins"), (4, "unit")]);
    assert!(cloud.storage.catalog_of(&sku("MILK")).await.unwrap().is_empty(), "the good row was not applied either");

    let good = bad.replace("4006381333932", "96385074").replace("litre", "gram");
    let reply = cloud.import("text/csv; charset=utf-8", &good).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"applied_rows": 3}));
    let milk = cloud.storage.catalog_of(&sku("MILK")).await.unwrap();
    assert!(milk.iter().any(|u| u.field == CatalogField::Name("Milk, whole".into())), "{milk:?}");
    assert_eq!(milk.len(), 5);

    let json_file = json!([{"sku":"BREAD","name":"Bread","gtins":[],"unit":"piece","tax_class":"reduced"}]);
    let reply = cloud.import("application/json", &json_file.to_string()).await;
    assert_eq!(reply.json(), json!({"applied_rows": 1}));
    let reply = cloud.import("application/xml", "<catalog/>").await;
    assert_eq!(reply.status, 415);

    // The catalog reaches the stores.
    let mut req = sync_request("s1", vec![], Cursor::default());
    req.push = None;
    let page = decode(&cloud.sync("s1", &cloud.s1, &req).await);
    assert_eq!(page.rows.catalog.len(), 20);
}

#[tokio::test]
async fn a_suspicious_price_is_held_until_confirmed() {
    let cloud = start().await;
    let set = |amount: &str, confirm: bool| json!({"sku":"MILK","scope":"chain","slot":"regular","amount":amount,"currency":"EUR","confirm":confirm});
    assert_eq!(cloud.put_price(set("1.29", false)).await.status, 200, "a first price has nothing to compare with");
    assert_eq!(cloud.put_price(set("1.49", false)).await.status, 200);

    let held = cloud.put_price(set("14.90", false)).await;
    assert_eq!(held.status, 202, "{}", held.text());
    let body = held.json();
    let id = body["held"].as_i64().unwrap();
    assert!(body["reason"].as_str().unwrap().contains("900% increase"), "{body}");
    let list = cloud.get("/v1/hq/prices/held", &cloud.admin).await.json();
    assert_eq!(list["held"][0]["id"], id);
    assert_eq!(list["held"][0]["price"]["amount"], "14.90");

    let shown = cloud.get("/v1/hq/prices/MILK", &cloud.admin).await.json();
    assert_eq!(shown["effective"]["chain"]["amount"], "1.49", "a held change does not apply: {shown}");
    let s1 = shown["effective"]["stores"].as_array().unwrap().iter().find(|s| s["store"] == "s1").unwrap().clone();
    assert_eq!(s1["price"]["amount"], "1.49");

    let confirmed =
        cloud.send_json("POST", &format!("/v1/hq/prices/held/{id}/confirm"), &cloud.admin, &json!({})).await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.text());
    let shown = cloud.get("/v1/hq/prices/MILK", &cloud.admin).await.json();
    assert_eq!(shown["effective"]["chain"]["amount"], "14.90");
    assert_eq!(shown["registers"].as_array().unwrap().len(), 1);
    let again = cloud.send_json("POST", &format!("/v1/hq/prices/held/{id}/confirm"), &cloud.admin, &json!({})).await;
    assert_eq!(again.status, 404, "{}", again.text());
    assert!(cloud.get("/v1/hq/prices/held", &cloud.admin).await.json()["held"].as_array().unwrap().is_empty());

    // A drop beyond the bound, confirmed up front, applies at once; a store price for an
    // unknown store is refused.
    assert_eq!(cloud.put_price(set("1.49", true)).await.status, 200);
    let store_price = json!({"sku":"MILK","scope":{"store":"s9"},"slot":"regular","amount":"1.00","currency":"EUR"});
    assert_eq!(cloud.put_price(store_price).await.status, 422);
    // A store's first promotion is compared with the effective price it replaces.
    let promo = json!({"sku":"MILK","scope":{"store":"s1"},"slot":"promotion","amount":"0.10","currency":"EUR",
        "window":{"from_ms":0,"until_ms":now_ms() + 3_600_000}});
    assert_eq!(cloud.put_price(promo).await.status, 202);
}

#[tokio::test]
async fn a_replayed_transfer_moves_stock_once() {
    let cloud = start().await;
    let transfer = json!({"id":"T-1","from":"s1","to":"s2","sku":"MILK","quantity":5});
    let first = cloud.transfer(&transfer).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json(), json!({"replayed": false}));
    assert_eq!(cloud.transfer(&transfer).await.json(), json!({"replayed": true}));
    let stock = cloud.get("/v1/hq/stock/MILK", &cloud.admin).await.json();
    let stores = stock["stores"].as_array().unwrap();
    assert_eq!(stores[0]["store"], "s1");
    assert_eq!(stores[0]["value"], -5);
    assert_eq!(stores[1]["value"], 5);
    assert_eq!(stock["chain_total"], 0);

    assert_eq!(cloud.transfer(&json!({"id":"T-2","from":"s1","to":"s1","sku":"MILK","quantity":5})).await.status, 422);
    assert_eq!(cloud.transfer(&json!({"id":"T-3","from":"s1","to":"s9","sku":"MILK","quantity":5})).await.status, 422);
    assert_eq!(cloud.transfer(&json!({"id":"T-4","from":"s1","to":"s2","sku":"MILK","quantity":0})).await.status, 422);
    assert_eq!(cloud.transfer(&json!({"id":"T-5","from":"s1","to":"s2","sku":"MILK","quantity":-1})).await.status, 400);
    assert_eq!(cloud.transfer(&json!({"id":"T-6","from":"s1","to":"s2","sku":"MILK"})).await.status, 400);
    let stock = cloud.get("/v1/hq/stock/MILK", &cloud.admin).await.json();
    assert_eq!(stock["stores"][0]["value"], -5, "refused transfers moved nothing");
}

// ---------------------------------------------------------------------------------------------
// Online orders

impl Cloud {
    async fn order(&self, body: &Value) -> Reply {
        self.send_json("POST", "/v1/hq/orders", &self.admin, body).await
    }

    /// s1 pushes `rows` as its versions `(from, to]` with nothing to pull back checked.
    async fn s1_pushes(&self, from: u64, to: u64, rows: Rows) -> SyncResponse {
        let mut req = sync_request("s1", vec![], Cursor::default());
        req.head_version = to;
        req.push = Some(Push { from_version: from, to_version: to, rows });
        decode(&self.sync("s1", &self.s1, &req).await)
    }

    async fn import_milk_and_eggs(&self) {
        let file =
            "sku,name,gtins,unit,tax_class,category\nMILK,Milk,,piece,reduced,dairy\nEGGS,Eggs,,piece,reduced,dairy\n";
        let reply = self.import("text/csv", file).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

fn key(sku_id: &str) -> EscrowKey {
    EscrowKey { store: store("s1"), sku: sku(sku_id) }
}

fn granted(sku_id: &str, granted: u64) -> EscrowRow {
    EscrowRow::Granted { key: key(sku_id), granted }
}

fn stock_and_escrow(slots: &[(&str, u64, u64)], escrow: Vec<EscrowRow>) -> Rows {
    Rows { stock: vec![own_slots("s1", slots)], escrow, ..Rows::default() }
}

fn order_body(order: &str, lines: &[(&str, i64)]) -> Value {
    let lines: Vec<Value> = lines.iter().map(|(sku, units)| json!({"sku": sku, "units": units})).collect();
    json!({"order": order, "store": "s1", "customer_ref": "cust 42", "lines": lines})
}

/// `2023-11-14T22:13:20.123Z`: RFC 3339 in UTC with milliseconds.
fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

#[tokio::test]
async fn an_online_order_is_reserved_shown_cancelled_and_refused_by_the_hq_api() {
    let cloud = start().await;
    cloud.import_milk_and_eggs().await;
    let dairy = cloud.storage.catalog_of(&sku("MILK")).await.unwrap();
    assert!(dairy.iter().any(|u| u.field == CatalogField::Category("dairy".into())), "{dairy:?}");
    // s1 grants 5 MILK and 2 EGGS to the online channel.
    let first = cloud
        .s1_pushes(
            0,
            3,
            stock_and_escrow(&[("MILK", 10, 0), ("EGGS", 5, 0)], vec![granted("MILK", 5), granted("EGGS", 2)]),
        )
        .await;
    assert_eq!(first.acked_version, 3);

    // Reserved: 201 with the pickup code, once.
    let body = order_body("W-1001", &[("MILK", 2)]);
    let reply = cloud.order(&body).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let made = reply.json();
    let keys: Vec<&str> = made.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = ["created_at", "customer_ref", "expires_at", "lines", "order", "pickup_code", "status", "store"];
    expected.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, expected, "{made}");
    assert_eq!(
        (made["order"].as_str(), made["store"].as_str(), made["status"].as_str()),
        (Some("W-1001"), Some("s1"), Some("reserved"))
    );
    assert_eq!(made["customer_ref"], "cust 42");
    assert_eq!(made["lines"], json!([{"sku": "MILK", "units": 2, "status": "reserved"}]));
    let code = made["pickup_code"].as_str().unwrap().to_owned();
    assert!(code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()), "{code}");
    assert!(
        is_rfc3339(made["created_at"].as_str().unwrap()) && is_rfc3339(made["expires_at"].as_str().unwrap()),
        "{made}"
    );
    let again = cloud.order(&body).await;
    assert_eq!((again.status, again.json()), (200, made.clone()), "a retry answers the first answer");
    let other = cloud.order(&order_body("W-1001", &[("MILK", 1)])).await;
    assert_eq!(other.status, 409, "{}", other.text());
    assert_eq!(other.json()["error"], "order exists");
    assert!(other.json()["message"].as_str().unwrap().contains("W-1001"));

    // The store receives the order with its reservation; only the code's digest travels.
    let mut pull = sync_request("s1", vec![], first.next_cursor);
    pull.push = None;
    let page = decode(&cloud.sync("s1", &cloud.s1, &pull).await);
    assert_eq!(page.rows.orders.len(), 1);
    let header = &page.rows.orders[0];
    let wrong = if code == "000000" { "000001" } else { "000000" };
    assert!(header.code_matches(&code) && !header.code_matches(wrong));
    assert_eq!(header.expires_at_ms - header.created_at_ms, 2880 * 60_000, "the configured pickup window");
    assert_eq!(
        page.rows.escrow,
        vec![EscrowRow::Reservation {
            key: key("MILK"),
            order: OrderId::new("W-1001").unwrap(),
            units: 2,
            seq: 1,
            cancelled: false
        }]
    );

    // Short: every short line named, nothing reserved.
    let short = cloud.order(&order_body("W-1002", &[("MILK", 4), ("EGGS", 3)])).await;
    assert_eq!(short.status, 409, "{}", short.text());
    let refusal = short.json();
    assert_eq!(refusal["error"], "insufficient allocation");
    assert_eq!(refusal["order"], "W-1002");
    assert_eq!(
        refusal["lines"],
        json!([{"sku":"MILK","wanted":4,"available":3},{"sku":"EGGS","wanted":3,"available":2}])
    );
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains("MILK") && message.contains("EGGS") && !message.contains('\n'), "{message}");
    assert_eq!(cloud.get("/v1/hq/orders/W-1002", &cloud.admin).await.status, 404);

    // Invalid bodies: 422 naming the field or line.
    for (body, names) in [
        (json!({"order":"W-9","store":"s9","customer_ref":"c","lines":[{"sku":"MILK","units":1}]}), "s9"),
        (order_body("W-9", &[("MILK", 1), ("BREAD", 1)]), "BREAD (line 2)"),
        (order_body("W-9", &[("MILK", 0)]), "line 1 (MILK) asks for 0 units"),
        (order_body("W-9", &[("MILK", 1), ("MILK", 2)]), "lines 1 and 2"),
        (order_body("W 9", &[("MILK", 1)]), "`order`"),
        (json!({"order":"W-9","store":"s1","lines":[{"sku":"MILK","units":1}]}), "customer_ref"),
    ] {
        let reply = cloud.order(&body).await;
        assert_eq!(reply.status, 422, "{body}: {}", reply.text());
        assert_eq!(reply.json()["error"], "invalid order");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(names), "{body}: {message}");
    }

    // Read: no code unless asked for; at_risk shown.
    let shown = cloud.get("/v1/hq/orders/W-1001", &cloud.admin).await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    let shown = shown.json();
    assert_eq!((shown["status"].as_str(), shown["at_risk"].as_bool()), (Some("reserved"), Some(false)));
    assert!(shown.get("pickup_code").is_none(), "{shown}");
    assert_eq!(shown["created_at"], made["created_at"]);
    let with_code = cloud.get("/v1/hq/orders/W-1001?with_code=true", &cloud.admin).await.json();
    assert_eq!(with_code["pickup_code"], code.as_str());
    assert_eq!(cloud.get("/v1/hq/orders/W-404", &cloud.admin).await.json()["error"], "unknown order");
    assert_eq!(cloud.get("/v1/hq/orders/W-1001", &cloud.s1).await.status, 403, "a store token cannot read orders");

    // Allocation per SKU.
    let allocation = cloud.get("/v1/hq/stores/s1/allocation", &cloud.admin).await.json();
    assert_eq!(
        allocation,
        json!({"store":"s1","skus":[
            {"sku":"EGGS","granted":2,"released":0,"reserved":0,"promised":0,"fulfilled":0,"cancelled":0,"rights":2},
            {"sku":"MILK","granted":5,"released":0,"reserved":2,"promised":2,"fulfilled":0,"cancelled":0,"rights":3}
        ]})
    );
    let milk = cloud.get("/v1/hq/stores/s1/allocation?sku=MILK", &cloud.admin).await.json();
    assert_eq!(milk["skus"].as_array().unwrap().len(), 1);
    assert_eq!(cloud.get("/v1/hq/stores/s9/allocation", &cloud.admin).await.status, 404);

    // Cancel, twice: the same answer.
    let cancel = cloud.send_json("POST", "/v1/hq/orders/W-1001/cancel", &cloud.admin, &json!({})).await;
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    let cancelled = cancel.json();
    assert_eq!(
        (cancelled["status"].as_str(), cancelled["lines"][0]["status"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );
    let twice = cloud.send_json("POST", "/v1/hq/orders/W-1001/cancel", &cloud.admin, &json!({})).await;
    assert_eq!((twice.status, twice.json()), (200, cancelled));
    assert_eq!(cloud.send_json("POST", "/v1/hq/orders/W-404/cancel", &cloud.admin, &json!({})).await.status, 404);

    // Handed over at the store: fulfilled after the sync, and no longer cancellable.
    assert_eq!(cloud.order(&order_body("W-1003", &[("MILK", 3)])).await.status, 201);
    let handover = EscrowRow::Fulfilled { key: key("MILK"), order: OrderId::new("W-1003").unwrap() };
    cloud.s1_pushes(3, 4, stock_and_escrow(&[("MILK", 10, 3)], vec![handover])).await;
    assert_eq!(cloud.get("/v1/hq/orders/W-1003", &cloud.admin).await.json()["status"], "fulfilled");
    let late = cloud.send_json("POST", "/v1/hq/orders/W-1003/cancel", &cloud.admin, &json!({})).await;
    assert_eq!(late.status, 409, "{}", late.text());
    assert_eq!(late.json()["error"], "already handed over");
    assert!(late.json()["message"].as_str().unwrap().contains("W-1003"));

    // Expired: not picked up in time (the sweep the service runs on an interval).
    let soon = json!({"order":"W-1004","store":"s1","customer_ref":"c","lines":[{"sku":"EGGS","units":1}],"pickup_window_minutes":1});
    assert_eq!(cloud.order(&soon).await.status, 201);
    let live = tokio_util::sync::CancellationToken::new();
    let swept = cloud_sync::expiry::sweep(&cloud.storage, now_ms() + 61_000, &live).await.unwrap();
    assert_eq!(swept.expired, 1);
    let expired = cloud.get("/v1/hq/orders/W-1004", &cloud.admin).await.json();
    assert_eq!(
        (expired["status"].as_str(), expired["lines"][0]["status"].as_str()),
        (Some("expired"), Some("expired"))
    );

    // A store's orders, by status, newest first.
    let list = |q: &'static str| {
        let cloud = &cloud;
        async move {
            let reply = cloud.get(&format!("/v1/hq/stores/s1/orders{q}"), &cloud.admin).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            let body = reply.json();
            assert_eq!(body["store"], "s1");
            body["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list("?status=cancelled").await, ["W-1001"]);
    assert_eq!(list("?status=fulfilled").await, ["W-1003"]);
    assert_eq!(list("?status=expired").await, ["W-1004"]);
    assert!(list("?status=reserved").await.is_empty());
    assert_eq!(list("").await.len(), 3);
    assert_eq!(list("?limit=1").await.len(), 1);
    let bad = cloud.get("/v1/hq/stores/s1/orders?status=open", &cloud.admin).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.json()["message"].as_str().unwrap().contains("reserved"));
    assert_eq!(cloud.get("/v1/hq/stores/s9/orders", &cloud.admin).await.json()["error"], "unknown store");
}

#[tokio::test]
async fn a_store_pushing_a_reservation_or_an_order_is_refused_and_recorded() {
    let cloud = start().await;
    let reservation = EscrowRow::Reservation {
        key: key("MILK"),
        order: OrderId::new("W-1").unwrap(),
        units: 5,
        seq: 1,
        cancelled: false,
    };
    let mut req = sync_request("s1", vec![], Cursor::default());
    req.push.as_mut().unwrap().rows.escrow = vec![granted("MILK", 5), reservation];
    let reply = cloud.sync("s1", &cloud.s1, &req).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.text().contains("only the cloud may"), "{}", reply.text());
    let order = OrderId::new("W-1").unwrap();
    let header = OrderHeader {
        pickup_code_digest: pickup_code_digest(&order, "123456"),
        order,
        store: store("s1"),
        customer_ref: "me".into(),
        created_at_ms: 1,
        expires_at_ms: 2,
        lines: vec![OrderLine { sku: sku("MILK"), units: 1 }],
    };
    let mut req = sync_request("s1", vec![], Cursor::default());
    req.push.as_mut().unwrap().rows.orders = vec![header];
    let reply = cloud.sync("s1", &cloud.s1, &req).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let events = cloud.events().await;
    assert_eq!(events.iter().filter(|e| e["kind"] == "ownership" && e["store"] == "s1").count(), 2, "{events:?}");
    assert!(
        cloud.storage.allocations(&store("s1"), None).await.unwrap().is_empty(),
        "nothing merged, not even the grant"
    );
}

#[tokio::test]
async fn the_cloud_sees_orders_at_risk_once_the_store_syncs_fewer_units_than_promised() {
    let cloud = start().await;
    cloud.import_milk_and_eggs().await;
    cloud.s1_pushes(0, 1, stock_and_escrow(&[("MILK", 5, 0)], vec![granted("MILK", 5)])).await;
    assert_eq!(cloud.order(&order_body("W-1", &[("MILK", 2)])).await.status, 201);
    assert_eq!(cloud.order(&order_body("W-2", &[("MILK", 3)])).await.status, 201);
    let none = cloud.get("/v1/hq/stores/s1/orders/at-risk", &cloud.admin).await.json();
    assert_eq!(none, json!({"store":"s1","orders":[],"skus":[]}));

    // Offline, s1 sells 3 MILK at the till; it syncs: 2 on hand, 5 promised.
    cloud.s1_pushes(1, 2, stock_and_escrow(&[("MILK", 5, 3)], vec![])).await;
    let risk = cloud.get("/v1/hq/stores/s1/orders/at-risk", &cloud.admin).await;
    assert_eq!(risk.status, 200, "{}", risk.text());
    assert_eq!(
        risk.json(),
        json!({"store":"s1","orders":[{"order":"W-2","sku":"MILK","units":3}],
               "skus":[{"sku":"MILK","on_hand":2,"promised":5,"short":3}]})
    );
    assert_eq!(cloud.get("/v1/hq/orders/W-2", &cloud.admin).await.json()["at_risk"], true);
    assert_eq!(
        cloud.get("/v1/hq/orders/W-1", &cloud.admin).await.json()["at_risk"],
        false,
        "reserved first, covered first"
    );
    let stores = cloud.get("/v1/hq/stores", &cloud.admin).await.json();
    let at_risk = |s: &str| {
        stores["stores"].as_array().unwrap().iter().find(|v| v["store"] == s).unwrap()["orders_at_risk"].clone()
    };
    assert_eq!((at_risk("s1"), at_risk("s2")), (json!(1), json!(0)));
    let reserved = cloud.get("/v1/hq/stores/s1/orders?status=reserved", &cloud.admin).await.json();
    let flags: Vec<(&str, bool)> = reserved["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["order"].as_str().unwrap(), o["at_risk"].as_bool().unwrap()))
        .collect();
    assert_eq!(flags, [("W-2", true), ("W-1", false)]);
}
