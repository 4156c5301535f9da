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
use shared::sync::{Cursor, Push, Rows, SlotGroup, SlotValue, SyncRequest, SyncResponse};
use shared::{wire, ActorId, CatalogField, HlcStamp, Sku, StoreId};
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
    assert!(text.contains("version 7") && text.contains("version 1"), "{text}");
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
