//! The HELLO check. A device on old firmware must be *detected*, not misread: postcard would
//! happily decode a different schema's bytes into wrong values. Every device opens with a HELLO
//! carrying its protocol version and [`SCHEMA_HASH`]; this module decides whether this build can
//! talk to it, and names the mismatch (which one, both values) so a technician knows whether to
//! update the device or the hub.

use core::fmt;

use crate::message::{Hello, RefuseReason};
use crate::schema::{PROTOCOL_VERSION, SCHEMA_HASH};

/// Errors of the compatibility check: the peer was built against other messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incompatible {
    /// The peer speaks another protocol version.
    ProtocolVersion {
        /// This build's [`PROTOCOL_VERSION`].
        ours: u8,
        /// The peer's.
        theirs: u8,
    },
    /// Same protocol version, different message types.
    Schema {
        /// This build's [`SCHEMA_HASH`].
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Incompatible::ProtocolVersion { ours, theirs } => write!(
                f,
                "protocol version mismatch: this build speaks version {ours}, the peer speaks \
                 version {theirs}; update the older side"
            ),
            Incompatible::Schema { ours, theirs } => write!(
                f,
                "schema mismatch: this build's schema hash is 0x{ours:08x}, the peer's is \
                 0x{theirs:08x} (same protocol version {PROTOCOL_VERSION}, different message \
                 types); build both from the same firmware-proto"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Incompatible {}

impl From<Incompatible> for RefuseReason {
    fn from(e: Incompatible) -> RefuseReason {
        match e {
            Incompatible::ProtocolVersion { ours, theirs } => RefuseReason::ProtocolVersion { ours, theirs },
            Incompatible::Schema { ours, theirs } => RefuseReason::Schema { ours, theirs },
        }
    }
}

/// Checks a peer's HELLO against this build: the protocol version first, then the schema hash.
/// The error's Display names which one differs and both values.
pub fn check_hello(hello: &Hello) -> Result<(), Incompatible> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Incompatible::ProtocolVersion { ours: PROTOCOL_VERSION, theirs: hello.protocol_version });
    }
    if hello.schema_hash != SCHEMA_HASH {
        return Err(Incompatible::Schema { ours: SCHEMA_HASH, theirs: hello.schema_hash });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::DeviceKind;
    use std::string::ToString;

    #[test]
    fn a_hello_from_this_build_is_accepted() {
        let hello = Hello::new(DeviceKind::Esl, "3.1.0").unwrap();
        assert_eq!(check_hello(&hello), Ok(()));
    }

    #[test]
    fn a_version_mismatch_is_named_with_both_versions() {
        let mut hello = Hello::new(DeviceKind::Esl, "3.1.0").unwrap();
        hello.protocol_version = 2;
        // Even with a different schema too, the version is what is reported.
        hello.schema_hash ^= 1;
        let err = check_hello(&hello).unwrap_err();
        assert_eq!(err, Incompatible::ProtocolVersion { ours: 1, theirs: 2 });
        let msg = err.to_string();
        assert!(msg.contains("protocol version mismatch"), "{msg}");
        assert!(msg.contains("speaks version 1") && msg.contains("speaks version 2"), "{msg}");
        assert_eq!(RefuseReason::from(err), RefuseReason::ProtocolVersion { ours: 1, theirs: 2 });
    }

    #[test]
    fn a_schema_mismatch_is_named_with_both_hashes() {
        let mut hello = Hello::new(DeviceKind::Lane, "0.9").unwrap();
        hello.schema_hash = 0xdead_beef;
        let err = check_hello(&hello).unwrap_err();
        assert_eq!(err, Incompatible::Schema { ours: SCHEMA_HASH, theirs: 0xdead_beef });
        let msg = err.to_string();
        assert!(msg.contains("schema mismatch"), "{msg}");
        assert!(msg.contains("0xdeadbeef"), "{msg}");
        assert!(msg.contains(&std::format!("0x{SCHEMA_HASH:08x}")), "{msg}");
        assert!(!msg.contains("version mismatch"), "{msg}");
    }

    #[test]
    fn refuse_reasons_say_what_happened() {
        let r = RefuseReason::from(Incompatible::Schema { ours: 1, theirs: 2 });
        assert_eq!(r.to_string(), "schema mismatch: hub schema hash 0x00000001, device schema hash 0x00000002");
    }
}
