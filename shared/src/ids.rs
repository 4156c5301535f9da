//! Validated identifiers, so a store id, a SKU or an actor id is never a bare string that
//! might be empty, too long, or carry characters that break a topic, a path or a CSV.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};

/// Why an identifier was refused; names the kind of id and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
    pub reason: String,
}

fn validate(what: &'static str, value: &str, max_len: usize, extra: &[char]) -> Result<(), IdError> {
    let refuse = |reason: String| IdError { what, value: value.chars().take(80).collect(), reason };
    if value.is_empty() {
        return Err(refuse("must not be empty".into()));
    }
    if value.len() > max_len {
        return Err(refuse(format!("longer than {max_len} bytes")));
    }
    // Bytes, not chars: every allowed character is ASCII, so the first byte refused starts a
    // character (a multi-byte one starts with a byte that is not ASCII). This runs for every
    // device message's topic.
    let allowed = |b: u8| {
        b.is_ascii_alphanumeric()
            || b == b'-'
            || b == b'_'
            || b == b'.'
            || (b.is_ascii() && extra.contains(&(b as char)))
    };
    if let Some((pos, c)) =
        value.bytes().position(|b| !allowed(b)).and_then(|pos| value[pos..].chars().next().map(|c| (pos, c)))
    {
        return Err(refuse(format!(
            "character {c:?} at byte {pos} is not allowed (use ASCII letters, digits, '-', '_', '.'{})",
            extra.iter().map(|c| format!(", '{c}'")).collect::<String>()
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $extra:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        // Written as the bare string, borrowed: no copy per id in every event body encoded.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            pub const MAX_LEN: usize = $max;

            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($what, &value, $max, $extra)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A store of the chain, e.g. `s0042`. Also a segment of MQTT topics, hence the tight charset.
    StoreId, "store id", 32, &[]
);
id_type!(
    /// A stock keeping unit: the chain's own product key (GTINs are attributes of a SKU).
    Sku, "SKU", 64, &[]
);
id_type!(
    /// A device of a store (label, scanner, scale, RFID reader, lane).
    DeviceId, "device id", 64, &[]
);
id_type!(
    /// A writer of replicated state: owns its stock slots and stamps its HLC writes.
    /// A store ledger is `store:{store_id}:{ledger}` (`store:{store_id}` before ledgers had their
    /// own); the cloud is `cloud`.
    ActorId, "actor id", 72, &[':']
);

impl ActorId {
    /// The actor id of a store ledger created before ledgers had their own actors
    /// (`store:{store_id}`). Such a ledger keeps writing with it.
    pub fn for_store(store: &StoreId) -> ActorId {
        ActorId(format!("store:{store}"))
    }

    /// The actor id one ledger of a store writes with: `store:{store_id}:{ledger}`, where
    /// `ledger` (letters, digits, '-', '_', '.', at most 32 bytes) is chosen when the ledger file
    /// is created. A ledger rebuilt after a lost disk gets a new one, so what it sells before
    /// its first sync is counted beside the old ledger's slots in the cloud instead of being
    /// merged (per-slot max) into them and hidden.
    pub fn for_store_ledger(store: &StoreId, ledger: &str) -> Result<ActorId, IdError> {
        validate("ledger id", ledger, 32, &[])?;
        ActorId::new(format!("store:{store}:{ledger}"))
    }

    /// Whether this is one of `store`'s actors (any of its ledgers, either form, with a ledger
    /// id [`ActorId::for_store_ledger`] accepts): what the cloud lets that store write.
    pub fn is_of_store(&self, store: &StoreId) -> bool {
        match self.0.strip_prefix("store:").and_then(|rest| rest.strip_prefix(store.as_str())) {
            Some("") => true,
            Some(rest) => rest.strip_prefix(':').is_some_and(|ledger| validate("ledger id", ledger, 32, &[]).is_ok()),
            None => false,
        }
    }

    /// The cloud's own actor (transfers, HQ corrections, online orders).
    pub fn cloud() -> ActorId {
        ActorId("cloud".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        assert_eq!(StoreId::new("s0042").unwrap().as_str(), "s0042");
        assert_eq!(ActorId::for_store(&StoreId::new("s1").unwrap()).as_str(), "store:s1");
        assert!(ActorId::new("store:s1").is_ok());
        let s1 = StoreId::new("s1").unwrap();
        assert_eq!(ActorId::for_store_ledger(&s1, "5f0c2a").unwrap().as_str(), "store:s1:5f0c2a");
    }

    #[test]
    fn a_store_owns_the_actors_of_all_its_ledgers_and_no_others() {
        let s1 = StoreId::new("s1").unwrap();
        let own = |a: &str| ActorId::new(a).unwrap().is_of_store(&s1);
        assert!(own("store:s1") && own("store:s1:5f0c2a"));
        let too_long = format!("store:s1:{}", "a".repeat(33));
        for foreign in [
            "store:s10",
            "store:s10:5f0c2a",
            "store:s",
            "store:s1:",
            "cloud",
            "s1",
            "store:s2:s1",
            "store:s1:a:b",
            &too_long,
        ] {
            assert!(!own(foreign), "{foreign}");
        }
        let e = ActorId::for_store_ledger(&s1, "a:b").unwrap_err();
        assert!(e.to_string().contains("ledger id"), "{e}");
        assert!(ActorId::for_store_ledger(&s1, "").is_err());
    }

    #[test]
    fn refuses_bad_ids_naming_what_and_why() {
        let e = StoreId::new("").unwrap_err();
        assert_eq!(e.to_string(), "invalid store id \"\": must not be empty");
        let e = Sku::new("ab/c").unwrap_err();
        assert!(e.to_string().contains("'/'") && e.to_string().contains("byte 2"), "{e}");
        assert!(StoreId::new("x".repeat(33)).is_err());
        assert!(StoreId::new("a:b").is_err(), "':' is only for actor ids");
    }

    #[test]
    fn serde_validates() {
        let ok: Sku = postcard::from_bytes(&postcard::to_allocvec("A-1").unwrap()).unwrap();
        assert_eq!(ok.as_str(), "A-1");
        let bad = postcard::to_allocvec("bad sku").unwrap();
        assert!(postcard::from_bytes::<Sku>(&bad).is_err());
    }

    #[test]
    fn serialises_as_the_bare_string() {
        let sku = Sku::new("A-1").unwrap();
        assert_eq!(postcard::to_allocvec(&sku).unwrap(), postcard::to_allocvec("A-1").unwrap());
        assert_eq!(serde_json::to_string(&sku).unwrap(), "\"A-1\"");
        let eur = crate::Currency::new("EUR").unwrap();
        assert_eq!(postcard::to_allocvec(&eur).unwrap(), postcard::to_allocvec("EUR").unwrap());
        assert_eq!(serde_json::to_string(&eur).unwrap(), "\"EUR\"");
    }
}
