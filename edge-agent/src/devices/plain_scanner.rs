//! The plain mode real barcode scanners ship with: the code's characters, optionally preceded
//! by an AIM symbology identifier (`]E0` EAN-13, `]A0` Code 39, `]C1` GS1-128...) and followed
//! by a configured suffix (CR, LF, CRLF, or none, in which case a quiet gap ends the code).
//! A pure parser: bytes and the time they arrived go in, codes come out; the serial link does
//! the I/O and the optional ACK/NAK replies.

use serde::Deserialize;

/// Longest code accepted, in bytes; longer input is discarded up to the next terminator.
pub const MAX_CODE_LEN: usize = 96;
/// ASCII ACK and NAK, sent back to scanners configured to expect them.
pub const ACK: u8 = 0x06;
pub const NAK: u8 = 0x15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Suffix {
    Cr,
    Lf,
    Crlf,
    /// No terminator: a code ends when no byte arrived for `gap_ms`.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainConfig {
    pub suffix: Suffix,
    /// Quiet time that ends a code without a suffix (and abandons a partial one with a suffix).
    pub gap_ms: u64,
}

/// One decoded code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainCode {
    /// The AIM symbology identifier, e.g. `]E0`, when the scanner sent one.
    pub symbology: Option<[u8; 3]>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainEvent {
    Code(PlainCode),
    /// Input that is not a code: too long, control bytes inside, or cut off by the gap. Answer
    /// with NAK where the scanner expects it.
    Garbled {
        reason: &'static str,
        bytes: usize,
    },
}

#[derive(Debug)]
pub struct PlainScanner {
    config: PlainConfig,
    buf: Vec<u8>,
    overflowed: bool,
    last_byte_ms: u64,
    /// A CR was just seen in CRLF mode, or in CR mode (to swallow a stray LF after it).
    after_cr: bool,
}

impl PlainScanner {
    pub fn new(config: PlainConfig) -> PlainScanner {
        PlainScanner {
            config,
            buf: Vec::with_capacity(MAX_CODE_LEN),
            overflowed: false,
            last_byte_ms: 0,
            after_cr: false,
        }
    }

    /// Feeds bytes received at `now_ms`.
    pub fn feed(&mut self, bytes: &[u8], now_ms: u64, out: &mut Vec<PlainEvent>) {
        if !self.buf.is_empty() || self.overflowed {
            self.poll(now_ms, out);
        }
        for &b in bytes {
            self.byte(b, out);
        }
        self.last_byte_ms = now_ms;
    }

    /// Ends a code without suffix (or abandons a partial code) once the line has been quiet
    /// for `gap_ms`. Call it when no bytes arrive, e.g. on a timer.
    pub fn poll(&mut self, now_ms: u64, out: &mut Vec<PlainEvent>) {
        if now_ms.saturating_sub(self.last_byte_ms) < self.config.gap_ms {
            return;
        }
        if self.config.suffix == Suffix::None {
            self.finish(out);
        } else if !self.buf.is_empty() || self.overflowed {
            let bytes = self.buf.len();
            self.reset();
            out.push(PlainEvent::Garbled { reason: "code cut off before its suffix", bytes });
        }
    }

    /// How long until `poll` may have something to do, if anything is pending.
    pub fn pending_deadline(&self) -> Option<u64> {
        (!self.buf.is_empty() || self.overflowed).then_some(self.last_byte_ms + self.config.gap_ms)
    }

    fn byte(&mut self, b: u8, out: &mut Vec<PlainEvent>) {
        let suffix = self.config.suffix;
        match b {
            b'\r' if matches!(suffix, Suffix::Cr | Suffix::Crlf) => {
                if suffix == Suffix::Cr {
                    self.finish(out);
                }
                self.after_cr = true;
                return;
            }
            b'\n' if suffix == Suffix::Lf || (suffix == Suffix::Crlf && self.after_cr) => {
                self.after_cr = false;
                self.finish(out);
                return;
            }
            b'\n' if suffix == Suffix::Cr && self.after_cr && self.buf.is_empty() => {
                // A scanner set to CRLF on a lane configured for CR: ignore the LF.
                self.after_cr = false;
                return;
            }
            _ => {}
        }
        if self.after_cr && suffix == Suffix::Crlf {
            // CR not followed by LF: the CR was data, which a barcode never carries.
            self.overflowed = true;
        }
        self.after_cr = false;
        if self.buf.len() >= MAX_CODE_LEN {
            self.overflowed = true;
            return;
        }
        self.buf.push(b);
    }

    fn finish(&mut self, out: &mut Vec<PlainEvent>) {
        if self.buf.is_empty() && !self.overflowed {
            return;
        }
        let bytes = std::mem::take(&mut self.buf);
        let overflowed = std::mem::replace(&mut self.overflowed, false);
        if overflowed {
            out.push(PlainEvent::Garbled { reason: "longer than a barcode can be", bytes: bytes.len() });
            return;
        }
        // GS (0x1D) is the GS1 FNC1 separator; other control bytes are line noise.
        if bytes.iter().any(|&c| (c < 0x20 && c != 0x1d) || c == 0x7f) {
            out.push(PlainEvent::Garbled { reason: "control characters inside the code", bytes: bytes.len() });
            return;
        }
        let (symbology, data) = match bytes.as_slice() {
            [b']', a, b, rest @ ..] if a.is_ascii_alphabetic() && b.is_ascii_alphanumeric() && !rest.is_empty() => {
                (Some([b']', *a, *b]), rest.to_vec())
            }
            _ => (None, bytes),
        };
        out.push(PlainEvent::Code(PlainCode { symbology, data }));
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.overflowed = false;
        self.after_cr = false;
    }
}

/// Suppresses the same code read twice by one scanner within a window (a customer holding
/// the item in the beam). A different code, or the same after the window, passes.
#[derive(Debug, Default)]
pub struct DoubleReadFilter {
    window_ms: u64,
    last: Option<(Vec<u8>, u64)>,
}

impl DoubleReadFilter {
    pub fn new(window_ms: u64) -> DoubleReadFilter {
        DoubleReadFilter { window_ms, last: None }
    }

    /// Whether this read counts (`false` = a double read to drop).
    pub fn accept(&mut self, data: &[u8], now_ms: u64) -> bool {
        let double =
            matches!(&self.last, Some((code, at)) if code == data && now_ms.saturating_sub(*at) < self.window_ms);
        if !double {
            self.last = Some((data.to_vec(), now_ms));
        }
        !double
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(suffix: Suffix, chunks: &[(&[u8], u64)], end_ms: u64) -> Vec<PlainEvent> {
        let mut s = PlainScanner::new(PlainConfig { suffix, gap_ms: 50 });
        let mut out = Vec::new();
        for (bytes, at) in chunks {
            s.feed(bytes, *at, &mut out);
        }
        s.poll(end_ms, &mut out);
        out
    }

    fn code(sym: Option<&[u8; 3]>, data: &[u8]) -> PlainEvent {
        PlainEvent::Code(PlainCode { symbology: sym.copied(), data: data.to_vec() })
    }

    #[test]
    fn every_suffix_and_the_aim_prefix() {
        assert_eq!(parse(Suffix::Cr, &[(b"]E04006381333931\r", 0)], 0), vec![code(Some(b"]E0"), b"4006381333931")]);
        assert_eq!(parse(Suffix::Lf, &[(b"4006381333931\n", 0)], 0), vec![code(None, b"4006381333931")]);
        assert_eq!(
            parse(Suffix::Crlf, &[(b"]C1010", 0), (b"12345\r", 1), (b"\n96385074\r\n", 2)], 2),
            vec![code(Some(b"]C1"), b"01012345"), code(None, b"96385074")]
        );
        // No suffix: the gap ends the code.
        assert_eq!(parse(Suffix::None, &[(b"9638", 0), (b"5074", 10)], 100), vec![code(None, b"96385074")]);
        assert_eq!(parse(Suffix::None, &[(b"9638", 0), (b"5074", 100)], 100), vec![code(None, b"9638")]);
        // A CR-configured lane tolerates CRLF.
        assert_eq!(
            parse(Suffix::Cr, &[(b"96385074\r\n12345670\r\n", 0)], 0),
            vec![code(None, b"96385074"), code(None, b"12345670")]
        );
    }

    #[test]
    fn garbage_is_reported_and_the_next_code_still_reads() {
        let mut long = vec![b'1'; MAX_CODE_LEN + 10];
        long.push(b'\r');
        let out = parse(Suffix::Cr, &[(&long, 0), (b"\x01\x02ab\r", 1), (b"96385074\r", 2)], 2);
        assert!(matches!(out[0], PlainEvent::Garbled { reason: "longer than a barcode can be", .. }));
        assert!(matches!(out[1], PlainEvent::Garbled { reason: "control characters inside the code", .. }));
        assert_eq!(out[2], code(None, b"96385074"));
        let out = parse(Suffix::Cr, &[(b"9638", 0)], 1_000);
        assert!(matches!(out[0], PlainEvent::Garbled { reason: "code cut off before its suffix", bytes: 4 }));
    }

    #[test]
    fn double_reads_inside_the_window_are_dropped() {
        let mut f = DoubleReadFilter::new(300);
        assert!(f.accept(b"A", 0));
        assert!(!f.accept(b"A", 200));
        assert!(f.accept(b"B", 250));
        assert!(f.accept(b"A", 260));
        assert!(f.accept(b"A", 600));
    }

    proptest! {
        #[test]
        fn never_panics(chunks in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..40), 0u64..100), 0..20)) {
            for suffix in [Suffix::Cr, Suffix::Lf, Suffix::Crlf, Suffix::None] {
                let mut s = PlainScanner::new(PlainConfig { suffix, gap_ms: 30 });
                let mut out = Vec::new();
                let mut t = 0;
                for (bytes, dt) in &chunks {
                    t += dt;
                    s.feed(bytes, t, &mut out);
                }
                s.poll(t + 1_000, &mut out);
                for e in out {
                    if let PlainEvent::Code(c) = e { prop_assert!(c.data.len() <= MAX_CODE_LEN && !c.data.is_empty()); }
                }
            }
        }
    }
}
