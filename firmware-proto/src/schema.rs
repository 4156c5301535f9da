//! Versioning of the wire format. postcard has no schema evolution: bytes of a newer message
//! read as an older type can *succeed with garbage* (DESIGN section 12). So two things travel
//! with the data: the [`PROTOCOL_VERSION`] byte, first in every payload and checked before
//! anything else is decoded, and the [`SCHEMA_HASH`], carried by every HELLO, which changes with
//! any change to any message type. [`SCHEMA`] spells out every type and field in wire order;
//! the hash is computed from it at compile time and pinned by a golden test, so a schema change
//! can only happen deliberately (edit the types, edit [`SCHEMA`], update the golden value).

/// Version of the envelope format; the first byte of every payload. Decoders refuse any other
/// value before decoding anything else.
pub const PROTOCOL_VERSION: u8 = 1;

/// Every message type and field, in wire order (postcard serializes struct fields in order and
/// enum variants by index, written here as `index:Name`). `Body` variants also carry their
/// `msg_id` (`=0xNN`). Strings are `String<N>` (at most N UTF-8 bytes), vectors `Vec<T,N>`.
///
/// Any change to a message type must change this text (and so [`SCHEMA_HASH`]).
pub const SCHEMA: &str = concat!(
    "store-edge firmware-proto schema\n",
    "Envelope{version:u8,device:String<32>,boot_id:u32,seq:u32,msg_id:u16,body:Body}\n",
    "Body{0:Hello=0x01,1:HelloAck=0x02,2:HelloRefused=0x03,3:Ack=0x04,4:Heartbeat=0x05,",
    "5:Scan=0x10,6:Weight=0x11,7:LaneInput=0x20,8:LaneDisplay=0x21,9:LabelCheckIn=0x30,",
    "10:LabelRender=0x31,11:CommandAck=0x32,12:TagReads=0x40,13:ReaderStatus=0x41,",
    "14:InventoryCycle=0x42}\n",
    "Hello{kind:DeviceKind,firmware:String<24>,protocol_version:u8,schema_hash:u32}\n",
    "DeviceKind{0:Esl,1:Scanner,2:Scale,3:Rfid,4:Lane}\n",
    "HelloAck{hub_time_ms:u64}\n",
    "HelloRefused{reason:RefuseReason}\n",
    "RefuseReason{0:ProtocolVersion{ours:u8,theirs:u8},1:Schema{ours:u32,theirs:u32},",
    "2:UnknownDevice}\n",
    "Ack{of_seq:u32}\n",
    "Heartbeat{uptime_s:u32,battery_pct:Option<u8>,rssi_dbm:Option<i8>}\n",
    "Scan{symbology:String<3>,data:Vec<u8,96>}\n",
    "Weight{grams:i32,stable:bool,under_zero:bool,over_capacity:bool}\n",
    "LaneInput{0:StartBasket,1:SetQuantity{line:u16,quantity:u32},2:VoidLine{line:u16},",
    "3:Tender(TenderKind),4:VoidBasket}\n",
    "TenderKind{0:Cash,1:Card}\n",
    "LaneDisplay{0:Line{line:u16,text:String<40>,quantity:i32,amount_minor:i64},",
    "1:LineVoided{line:u16},2:Total{amount_minor:i64,items:u16,currency:String<3>},",
    "3:Message{code:LaneMessageCode,text:String<64>},",
    "4:Receipt{receipt_id:String<40>,total_minor:i64},5:Cleared}\n",
    "LaneMessageCode{0:UnknownProduct,1:InvalidBarcode,2:Discontinued,3:WaitForStableWeight,",
    "4:ScaleError,5:WeighedItemNeedsScale,6:Info,7:Error}\n",
    "LabelCheckIn{shown_hash:u64,battery_pct:u8,rssi_dbm:i8}\n",
    "LabelRender{content_hash:u64,name:String<40>,price_minor:i64,currency:String<3>,",
    "promo:Option<Promo>,unit_price:Option<UnitPrice>,expires_ms:u64}\n",
    "Promo{price_minor:i64,until_ms:u64}\n",
    "UnitPrice{price_minor:i64,per:String<8>}\n",
    "CommandAck{of_seq:u32,stage:AckStage,content_hash:Option<u64>,code:u16}\n",
    "AckStage{0:Queued,1:Delivered,2:Applied,3:Failed}\n",
    "TagReads{reads:Vec<TagRead,16>}\n",
    "TagRead{epc:Vec<u8,32>,antenna:u8,rssi_cdbm:i16,count:u16}\n",
    "ReaderStatus{overflow:u32,temperature_c:Option<i8>}\n",
    "InventoryCycle{cycle_id:u32,ended:bool,antennas:Vec<u8,16>}\n",
);

/// FNV-1a (32-bit) of [`SCHEMA`]. A HELLO carries it; [`crate::check_hello`] refuses a peer
/// whose value differs. Pinned by `tests/golden.rs`.
pub const SCHEMA_HASH: u32 = fnv1a_32(SCHEMA.as_bytes());

/// Every message id with its [`crate::Body::name`], in `Body` variant order.
pub const MESSAGES: [(u16, &str); 15] = [
    (0x01, "hello"),
    (0x02, "hello_ack"),
    (0x03, "hello_refused"),
    (0x04, "ack"),
    (0x05, "heartbeat"),
    (0x10, "scan"),
    (0x11, "weight"),
    (0x20, "lane_input"),
    (0x21, "lane_display"),
    (0x30, "label_check_in"),
    (0x31, "label_render"),
    (0x32, "command_ack"),
    (0x40, "tag_reads"),
    (0x41, "reader_status"),
    (0x42, "inventory_cycle"),
];

/// The name of a message id (for logs about messages that did not decode), if it is known.
pub fn msg_name(msg_id: u16) -> Option<&'static str> {
    MESSAGES.iter().find(|(id, _)| *id == msg_id).map(|(_, name)| *name)
}

/// FNV-1a, 32-bit (offset basis 0x811c9dc5, prime 0x01000193), usable in `const` context.
pub const fn fnv1a_32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_vectors() {
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn msg_name_knows_every_id_and_only_those() {
        for (id, name) in MESSAGES {
            assert_eq!(msg_name(id), Some(name));
        }
        assert_eq!(msg_name(0), None);
        assert_eq!(msg_name(0x43), None);
    }

    #[test]
    fn message_ids_are_one_byte_varints_and_unique() {
        for (i, (id, _)) in MESSAGES.iter().enumerate() {
            assert!(*id < 0x80, "msg_id 0x{id:02x} would not be a one-byte varint");
            assert!(MESSAGES[..i].iter().all(|(other, _)| other != id));
        }
    }

    #[test]
    fn schema_body_line_lists_every_message_in_variant_order() {
        let line = SCHEMA.lines().find(|l| l.starts_with("Body{")).expect("SCHEMA has a Body line");
        let inner = line.trim_start_matches("Body{").trim_end_matches('}');
        let entries: std::vec::Vec<&str> = inner.split(',').collect();
        assert_eq!(entries.len(), MESSAGES.len());
        for (i, entry) in entries.iter().enumerate() {
            let (index, rest) = entry.split_once(':').unwrap();
            let (_, id) = rest.split_once("=0x").unwrap();
            assert_eq!(index.parse::<usize>().unwrap(), i);
            assert_eq!(u16::from_str_radix(id, 16).unwrap(), MESSAGES[i].0);
        }
    }
}
