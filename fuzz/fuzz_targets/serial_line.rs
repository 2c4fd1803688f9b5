//! Serial-line framing: arbitrary delimiter, maximum and byte chunks (no
//! delimiter, huge lines, invalid UTF-8). Properties: no panic, memory
//! bounded by the maximum, every line emitted is within the maximum and
//! contains no delimiter, and the counters add up.
#![no_main]

use edgebridge::drivers::serial_line::codec::LineFramer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, u16, Vec<Vec<u8>>)| {
    let (delimiter, max, chunks) = input;
    let delimiter: String = delimiter.chars().take(4).collect();
    let max = usize::from(max % 2048) + 1;
    let mut framer = LineFramer::new(&delimiter, max);
    let delim = if delimiter.is_empty() {
        "\n"
    } else {
        delimiter.as_str()
    };
    let mut out = Vec::new();
    for c in &chunks {
        framer.feed(c, &mut out);
    }
    let stats = framer.stats();
    assert_eq!(stats.lines, out.len() as u64);
    for line in &out {
        assert!(!line.is_empty());
        // (U+FFFD itself may appear by replacement, so skip that case.)
        if !delim.contains('\u{FFFD}') {
            assert!(
                !line.contains(delim),
                "{line:?} holds the delimiter {delim:?}"
            );
        }
        // U+FFFD replacement may lengthen invalid bytes (1 -> 3).
        assert!(line.len() <= max * 3, "line of {} > {max}", line.len());
    }
    // After a reset no partial line is left: bytes without the delimiter
    // complete nothing.
    framer.reset();
    let mut more = Vec::new();
    if !"after reset".contains(delim) {
        framer.feed(b"after reset", &mut more);
        assert!(more.is_empty(), "a partial line survived reset: {more:?}");
    }
});
