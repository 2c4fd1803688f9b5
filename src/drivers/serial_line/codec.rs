//! Splits the byte stream of a serial port into text lines.
//!
//! Field devices send what they like: lines longer than any sane message
//! (a baud-rate mismatch produces endless garbage without delimiters),
//! bytes that are not UTF-8, `\r\n` where `\n` was configured. None of it
//! may grow memory or stop the reader, so an oversize line is dropped and
//! counted, invalid UTF-8 is replaced (U+FFFD) and counted, and with the
//! default `\n` delimiter a trailing `\r` is removed.

/// Default delimiter.
pub const DEFAULT_DELIMITER: &str = "\n";
/// Default longest line, in bytes without the delimiter.
pub const DEFAULT_MAX_LINE: usize = 1024;

/// What the framer has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Lines handed out.
    pub lines: u64,
    /// Lines dropped because they were longer than the maximum.
    pub oversize: u64,
    /// Lines handed out with invalid UTF-8 replaced.
    pub invalid_utf8: u64,
}

/// Incremental line splitter: feed it bytes as they arrive.
#[derive(Debug)]
pub struct LineFramer {
    delimiter: Vec<u8>,
    max_len: usize,
    buf: Vec<u8>,
    /// Inside an oversize line: drop bytes up to the next delimiter.
    discarding: bool,
    /// How far `buf` has been searched for the delimiter.
    scanned: usize,
    stats: LineStats,
}

impl LineFramer {
    /// `delimiter` must not be empty (validation checks it; an empty one
    /// falls back to `\n`).
    pub fn new(delimiter: &str, max_len: usize) -> LineFramer {
        let delimiter = if delimiter.is_empty() {
            DEFAULT_DELIMITER
        } else {
            delimiter
        };
        LineFramer {
            delimiter: delimiter.as_bytes().to_vec(),
            max_len: max_len.max(1),
            buf: Vec::new(),
            discarding: false,
            scanned: 0,
            stats: LineStats::default(),
        }
    }

    pub fn stats(&self) -> LineStats {
        self.stats
    }

    /// Forgets a partial line (after the port was lost and reopened).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.discarding = false;
    }

    /// Adds received bytes and appends every completed line to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<String>) {
        self.buf.extend_from_slice(data);
        let dlen = self.delimiter.len();
        loop {
            let from = self.scanned.saturating_sub(dlen - 1);
            let found = self.buf[from..]
                .windows(dlen)
                .position(|w| w == self.delimiter.as_slice())
                .map(|p| p + from);
            match found {
                Some(at) => {
                    let line: Vec<u8> = self.buf.drain(..at + dlen).take(at).collect();
                    self.scanned = 0;
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    self.emit(line, out);
                }
                None => {
                    self.scanned = self.buf.len();
                    // Keep a possible partial delimiter, drop the rest.
                    if self.buf.len() > self.max_len + dlen {
                        if !self.discarding {
                            self.discarding = true;
                            self.stats.oversize += 1;
                        }
                        let keep = dlen - 1;
                        let cut = self.buf.len() - keep;
                        self.buf.drain(..cut);
                        self.scanned = self.buf.len();
                    }
                    return;
                }
            }
        }
    }

    fn emit(&mut self, mut line: Vec<u8>, out: &mut Vec<String>) {
        if self.delimiter == b"\n" && line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > self.max_len {
            self.stats.oversize += 1;
            return;
        }
        if line.is_empty() {
            return;
        }
        let text = match String::from_utf8(line) {
            Ok(s) => s,
            Err(e) => {
                self.stats.invalid_utf8 += 1;
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        };
        self.stats.lines += 1;
        out.push(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(f: &mut LineFramer, chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out);
        }
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        let mut f = LineFramer::new("\n", 100);
        let out = feed_all(&mut f, &[b"$GPGGA,1", b"23\n$GPRMC", b",x\r\n", b"partial"]);
        assert_eq!(out, vec!["$GPGGA,123", "$GPRMC,x"]);
        assert_eq!(f.stats().lines, 2);
        // The partial line completes later.
        assert_eq!(feed_all(&mut f, &[b" end\n"]), vec!["partial end"]);
    }

    #[test]
    fn empty_lines_are_skipped() {
        let mut f = LineFramer::new("\n", 100);
        assert_eq!(feed_all(&mut f, &[b"\n\r\na\n\n"]), vec!["a"]);
    }

    #[test]
    fn multi_byte_delimiter_split_between_chunks() {
        let mut f = LineFramer::new("\r\n", 100);
        let out = feed_all(&mut f, &[b"one\r", b"\ntwo\r\nthree\n\r", b"\n"]);
        assert_eq!(out, vec!["one", "two", "three\n"]);
        let mut f = LineFramer::new(";", 100);
        assert_eq!(feed_all(&mut f, &[b"a=1;b=2;"]), vec!["a=1", "b=2"]);
    }

    #[test]
    fn oversize_lines_are_dropped_and_counted_and_memory_stays_bounded() {
        let mut f = LineFramer::new("\n", 8);
        let mut out = Vec::new();
        f.feed(b"ok\n", &mut out);
        // 10 KiB without a delimiter, in small chunks.
        for _ in 0..1000 {
            f.feed(b"xxxxxxxxxx", &mut out);
            assert!(f.buf.len() <= 9 + 1, "buffer grew to {}", f.buf.len());
        }
        f.feed(b"tail\nnext\n", &mut out);
        // A line of exactly 9 bytes in one chunk is also too long.
        f.feed(b"123456789\n12345678\n", &mut out);
        assert_eq!(out, vec!["ok", "next", "12345678"]);
        assert_eq!(
            f.stats(),
            LineStats {
                lines: 3,
                oversize: 2,
                invalid_utf8: 0
            }
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_and_counted() {
        let mut f = LineFramer::new("\n", 100);
        let out = feed_all(&mut f, &[b"t=\xff\xfe21\n", b"\xc3\xa9t\xc3\xa9\n"]);
        assert_eq!(out, vec!["t=\u{FFFD}\u{FFFD}21", "été"]);
        assert_eq!(f.stats().invalid_utf8, 1);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut f = LineFramer::new("\r\n", 16);
        let mut out = Vec::new();
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let mut chunk = Vec::new();
            for _ in 0..(x % 37) {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                chunk.push((x >> 16) as u8);
            }
            f.feed(&chunk, &mut out);
            assert!(f.buf.len() <= 16 + 2 + 37);
        }
        assert!(out.iter().all(|l| l.len() <= 16 * 3));
    }

    #[test]
    fn reset_forgets_partial_line() {
        let mut f = LineFramer::new("\n", 100);
        assert!(feed_all(&mut f, &[b"half"]).is_empty());
        f.reset();
        assert_eq!(feed_all(&mut f, &[b"new\n"]), vec!["new"]);
    }
}
