//! Guest output: capture, line splitting, escaping, the per-event cap, and sinks.
//!
//! Guest output is captured in memory while the event runs and handed to an [`OutputSink`] line
//! by line when the event ends, in the order the lines were completed. Control characters are
//! escaped so a guest cannot forge log lines or drive the terminal of whoever reads the logs.
//!
//! The output cap bounds what the host writes and holds, not what the guest produced: each line
//! costs its escaped text plus the sink's framing ([`OutputSink::framing`]: event id, stream
//! name, separators, newline). Lines are kept while their cost fits the cap; the line that does
//! not fit is cut to what does, followed by one marker line ([`cap_marker`], the only thing
//! written beyond the cap). So a sink writes at most `cap` bytes plus one marker line per
//! event, however the guest's bytes are shaped (a megabyte of newlines is not a million
//! lines), and the capture holds at most `cap` bytes of text plus 16 bytes per line.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::EventOutcome;

/// Where a line of guest output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stream {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
    /// A jobicolet `env.log` call, with its level.
    Log(LogLevel),
    /// The jobicolet result string.
    Result,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::Stderr => f.write_str("stderr"),
            Self::Log(level) => write!(f, "log.{level}"),
            Self::Result => f.write_str("result"),
        }
    }
}

/// The level of a jobicolet `env.log` line (JobicoK8S used zerolog's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    /// -1.
    Trace,
    /// 0.
    Debug,
    /// 1.
    Info,
    /// 2.
    Warn,
    /// 3.
    Error,
    /// 4.
    Fatal,
    /// 5.
    Panic,
    /// 6: the guest gave no level.
    None,
    /// Any other number.
    Unknown(i32),
}

impl LogLevel {
    /// Maps the guest's level number.
    pub fn from_guest(level: i32) -> Self {
        match level {
            -1 => Self::Trace,
            0 => Self::Debug,
            1 => Self::Info,
            2 => Self::Warn,
            3 => Self::Error,
            4 => Self::Fatal,
            5 => Self::Panic,
            6 => Self::None,
            other => Self::Unknown(other),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Trace => f.write_str("trace"),
            Self::Debug => f.write_str("debug"),
            Self::Info => f.write_str("info"),
            Self::Warn => f.write_str("warn"),
            Self::Error => f.write_str("error"),
            Self::Fatal => f.write_str("fatal"),
            Self::Panic => f.write_str("panic"),
            Self::None => f.write_str("none"),
            Self::Unknown(level) => write!(f, "level{level}"),
        }
    }
}

/// Receives each complete, escaped line of a guest's output.
pub trait OutputSink {
    /// One line (without its newline) of `event_id`'s output on `stream`.
    fn line(&mut self, event_id: &str, stream: Stream, line: &str);

    /// Bytes this sink writes for each line of `event_id` besides the line's text and the
    /// stream's name (prefix, separators, newline): what the output cap charges per line. The
    /// default is [`StdoutSink`]'s `<event id> <stream> <line>\n`.
    fn framing(&self, event_id: &str) -> usize {
        escape(event_id.as_bytes()).len() + STDOUT_FRAMING
    }

    /// Called once per event after its last line, with its outcome.
    fn finish(&mut self, _outcome: &EventOutcome) {}
}

/// The two spaces and the newline of `<event id> <stream> <line>\n`.
const STDOUT_FRAMING: usize = 3;

/// Raw bytes looked at beyond the room left under the cap when a line must be cut: more than
/// the longest UTF-8 character (4 bytes), so cutting the raw bytes never changes the escaped
/// text within the room.
const CUT_SLACK: usize = 8;

/// Writes lines to the process's stdout as `<event id> <stream> <line>`, the binary's format.
#[derive(Debug)]
pub struct StdoutSink {
    out: io::BufWriter<io::Stdout>,
}

impl StdoutSink {
    /// A sink on this process's stdout (buffered; flushed after each event).
    pub fn new() -> Self {
        Self {
            out: io::BufWriter::new(io::stdout()),
        }
    }
}

impl Default for StdoutSink {
    fn default() -> Self {
        Self::new()
    }
}

impl OutputSink for StdoutSink {
    fn line(&mut self, event_id: &str, stream: Stream, line: &str) {
        // Stdout going away (closed pipe) must not fail the events; there is nowhere to report it.
        let _ = writeln!(self.out, "{} {stream} {line}", escape(event_id.as_bytes()));
    }

    fn finish(&mut self, _outcome: &EventOutcome) {
        let _ = self.out.flush();
    }
}

/// One line collected by a [`VecSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// The event that produced it.
    pub event_id: String,
    /// The stream it came from.
    pub stream: Stream,
    /// The escaped text, without newline.
    pub text: String,
}

/// Collects lines in memory, for tests and callers that store output.
#[derive(Debug, Clone, Default)]
pub struct VecSink {
    /// Lines in the order they were delivered.
    pub lines: Vec<OutputLine>,
}

impl VecSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Texts of the lines on `stream`.
    pub fn texts(&self, stream: Stream) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|line| line.stream == stream)
            .map(|line| line.text.as_str())
            .collect()
    }
}

impl OutputSink for VecSink {
    fn line(&mut self, event_id: &str, stream: Stream, line: &str) {
        self.lines.push(OutputLine {
            event_id: event_id.to_owned(),
            stream,
            text: line.to_owned(),
        });
    }
}

/// Escapes one line: invalid UTF-8 becomes U+FFFD, control characters other than tab become
/// `\xNN` / `\u{NNNN}`. Backslashes are left alone so JSON output stays valid JSON.
pub fn escape(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push('\t'),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Text of the line emitted once when an event's output reaches the cap.
pub fn cap_marker(cap: u64) -> String {
    format!("[wasm-exec: output cap of {cap} bytes reached, further output of this event dropped]")
}

/// Per-event capture buffer shared by the guest's stdout/stderr streams and `env.log`.
#[derive(Debug)]
pub(crate) struct Capture {
    cap: u64,
    /// The sink's per-line framing, without the stream's name.
    framing: u64,
    /// Bytes the guest produced, kept or not.
    produced: u64,
    /// Bytes the kept lines will cost the sink (counted against the cap).
    emitted: u64,
    truncated: bool,
    partial_stdout: Vec<u8>,
    partial_stderr: Vec<u8>,
    /// The kept lines' escaped texts, one after another.
    text: String,
    /// Each kept line's stream and where its text ends in `text`.
    lines: Vec<(Stream, usize)>,
    /// Standard output as the guest wrote it, when kept as the result (at most `cap` bytes).
    stdout_result: Option<Vec<u8>>,
    /// Whether standard output went beyond what `stdout_result` holds.
    stdout_result_cut: bool,
}

impl Capture {
    pub(crate) fn new(cap: u64, framing: usize) -> Self {
        Self {
            cap,
            framing: framing as u64,
            produced: 0,
            emitted: 0,
            truncated: false,
            partial_stdout: Vec::new(),
            partial_stderr: Vec::new(),
            text: String::new(),
            lines: Vec::new(),
            stdout_result: None,
            stdout_result_cut: false,
        }
    }

    /// Keeps standard output's bytes as they are (up to the cap) besides its lines: the
    /// result of a WASI command.
    pub(crate) fn keep_stdout_result(&mut self) {
        self.stdout_result = Some(Vec::new());
    }

    /// Bytes the sink may still write under the cap.
    fn room(&self) -> u64 {
        self.cap.saturating_sub(self.emitted)
    }

    /// The raw bytes worth escaping for a line that may be cut.
    fn bounded(&self, raw: usize) -> usize {
        let room = usize::try_from(self.room()).unwrap_or(usize::MAX);
        raw.min(room.saturating_add(CUT_SLACK))
    }

    fn partial(&mut self, stream: Stream) -> Option<&mut Vec<u8>> {
        match stream {
            Stream::Stdout => Some(&mut self.partial_stdout),
            Stream::Stderr => Some(&mut self.partial_stderr),
            _ => None,
        }
    }

    /// Keeps one line (raw bytes, without newline), cut if it does not fit; returns whether
    /// output may go on.
    fn emit(&mut self, stream: Stream, raw: &[u8]) -> bool {
        let bounded = &raw[..self.bounded(raw.len())];
        let text = escape(if bounded.len() == raw.len() {
            strip_cr(raw)
        } else {
            bounded
        });
        let overhead = self.framing + stream.to_string().len() as u64;
        let cost = overhead + text.len() as u64;
        if cost <= self.room() {
            self.keep(stream, &text, cost);
            return true;
        }
        let fits = usize::try_from(self.room().saturating_sub(overhead)).unwrap_or(usize::MAX);
        let mut end = fits.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end > 0 {
            self.keep(stream, &text[..end], overhead + end as u64);
        }
        self.truncated = true;
        let marker = cap_marker(self.cap);
        self.text.push_str(&marker);
        self.lines.push((stream, self.text.len()));
        false
    }

    fn keep(&mut self, stream: Stream, text: &str, cost: u64) {
        self.emitted += cost;
        self.text.push_str(text);
        self.lines.push((stream, self.text.len()));
    }

    /// Emits the partial line of `stream` (even when empty: it ended with a newline).
    fn emit_partial(&mut self, stream: Stream) -> bool {
        let partial = std::mem::take(self.partial(stream).expect("a byte stream"));
        let more = self.emit(stream, &partial);
        // Keep the allocation for the next line.
        let mut partial = partial;
        partial.clear();
        *self.partial(stream).expect("a byte stream") = partial;
        more
    }

    /// Guest bytes written to stdout or stderr: split into lines, partial lines kept (no more
    /// of them than could be written).
    pub(crate) fn write(&mut self, stream: Stream, bytes: &[u8]) {
        self.produced += bytes.len() as u64;
        if stream == Stream::Stdout
            && let Some(result) = &mut self.stdout_result
        {
            let room = usize::try_from(self.cap)
                .unwrap_or(usize::MAX)
                .saturating_sub(result.len());
            result.extend_from_slice(&bytes[..bytes.len().min(room)]);
            self.stdout_result_cut |= bytes.len() > room;
        }
        let mut rest = bytes;
        while !self.truncated {
            let newline = rest.iter().position(|&b| b == b'\n');
            let line = &rest[..newline.unwrap_or(rest.len())];
            let held = self.partial(stream).map_or(0, |p| p.len());
            let take = line
                .len()
                .min(self.bounded(usize::MAX).saturating_sub(held));
            self.partial(stream)
                .expect("a byte stream")
                .extend_from_slice(&line[..take]);
            match newline {
                Some(at) => {
                    self.emit_partial(stream);
                    rest = &rest[at + 1..];
                }
                None => {
                    if take < line.len() {
                        // This line can no longer fit: cut it now rather than hold it.
                        self.emit_partial(stream);
                    }
                    return;
                }
            }
        }
    }

    /// A whole message (`env.log` line or result): every line of it becomes a line on `stream`.
    pub(crate) fn message(&mut self, stream: Stream, bytes: &[u8]) {
        self.produced += bytes.len() as u64;
        for line in bytes.split(|&b| b == b'\n') {
            if self.truncated || !self.emit(stream, line) {
                break;
            }
        }
    }

    /// Ends the event: flushes partial lines and returns everything captured.
    pub(crate) fn finish(&mut self) -> Captured {
        for stream in [Stream::Stdout, Stream::Stderr] {
            if !self.truncated && self.partial(stream).is_some_and(|p| !p.is_empty()) {
                self.emit_partial(stream);
            }
        }
        let stdout_result = self.stdout_result.take().map(|bytes| {
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            if self.stdout_result_cut {
                text.push('…');
            }
            text
        });
        Captured {
            stdout_result,
            text: std::mem::take(&mut self.text),
            lines: std::mem::take(&mut self.lines),
            produced: self.produced,
            emitted: self.emitted,
            truncated: self.truncated,
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What one event printed.
pub(crate) struct Captured {
    /// Standard output as text, when kept as the result; `…` ends it when it was cut.
    pub(crate) stdout_result: Option<String>,
    text: String,
    lines: Vec<(Stream, usize)>,
    /// Bytes the guest produced.
    pub(crate) produced: u64,
    /// Bytes the kept lines cost the sink, the marker line aside.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) emitted: u64,
    pub(crate) truncated: bool,
}

impl Captured {
    /// The kept lines, in order.
    pub(crate) fn lines(&self) -> impl Iterator<Item = (Stream, &str)> {
        let mut start = 0;
        self.lines.iter().map(move |&(stream, end)| {
            let line = &self.text[start..end];
            start = end;
            (stream, line)
        })
    }
}

/// A capture buffer shared between the store's streams and host functions.
#[derive(Debug, Clone)]
pub(crate) struct SharedCapture(Arc<Mutex<Capture>>);

impl SharedCapture {
    pub(crate) fn new(cap: u64, framing: usize) -> Self {
        Self(Arc::new(Mutex::new(Capture::new(cap, framing))))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Capture> {
        // A panic while holding the lock leaves the buffer usable; keep going.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters() {
        assert_eq!(escape(b"plain text"), "plain text");
        assert_eq!(escape(b"a\x1b[31mred\x07"), "a\\x1b[31mred\\x07");
        assert_eq!(escape(b"tab\tkept"), "tab\tkept");
        assert_eq!(escape(br#"{"a":"b\"c"}"#), r#"{"a":"b\"c"}"#);
        assert_eq!(escape("c1\u{85}".as_bytes()), "c1\\u{0085}");
        assert_eq!(escape(b"bad\xffutf8"), "bad\u{fffd}utf8");
    }

    fn lines(captured: &Captured) -> Vec<(Stream, &str)> {
        captured.lines().collect()
    }

    #[test]
    fn standard_output_kept_as_the_result_is_the_bytes_written_up_to_the_cap() {
        let mut capture = Capture::new(16, 0);
        capture.keep_stdout_result();
        capture.write(Stream::Stdout, b"{\"a\":\t1}\n");
        capture.write(Stream::Stderr, b"not the result\n");
        let captured = capture.finish();
        assert_eq!(captured.stdout_result.as_deref(), Some("{\"a\":\t1}\n"));

        let mut capture = Capture::new(8, 0);
        capture.keep_stdout_result();
        capture.write(Stream::Stdout, b"0123456789");
        assert_eq!(capture.finish().stdout_result.as_deref(), Some("01234567…"));

        let mut capture = Capture::new(8, 0);
        capture.write(Stream::Stdout, b"{}");
        assert_eq!(capture.finish().stdout_result, None, "kept only when asked");
    }

    #[test]
    fn splits_lines_across_writes() {
        let mut capture = Capture::new(1 << 20, 0);
        capture.write(Stream::Stdout, b"hel");
        capture.write(Stream::Stderr, b"err\r\n");
        capture.write(Stream::Stdout, b"lo\nwor");
        capture.write(Stream::Stdout, b"ld");
        let captured = capture.finish();
        assert_eq!(
            lines(&captured),
            [
                (Stream::Stderr, "err"),
                (Stream::Stdout, "hello"),
                (Stream::Stdout, "world"),
            ]
        );
        assert_eq!(captured.produced, 16);
        assert!(!captured.truncated);
    }

    #[test]
    fn the_cap_charges_framing_and_keeps_a_prefix_then_one_marker() {
        // Framing 4 + "stdout" (6) = 10 bytes per line besides its text; cap 30.
        let mut capture = Capture::new(30, 4);
        capture.write(Stream::Stdout, b"12345\n");
        capture.write(Stream::Stdout, b"67890abc\n");
        capture.write(Stream::Stderr, b"more\n");
        capture.message(Stream::Log(LogLevel::Info), b"dropped");
        let captured = capture.finish();
        assert_eq!(
            lines(&captured),
            [
                (Stream::Stdout, "12345"),
                (Stream::Stdout, "67890"),
                (Stream::Stdout, cap_marker(30).as_str()),
            ]
        );
        assert_eq!(captured.emitted, 30);
        assert_eq!(captured.produced, 6 + 9 + 5 + 7);
        assert!(captured.truncated);
    }

    #[test]
    fn newlines_cost_their_framing_so_they_cannot_multiply_the_output() {
        let cap = 1 << 20;
        let framing = 40;
        let mut capture = Capture::new(cap, framing);
        for _ in 0..16 {
            capture.write(Stream::Stdout, &[b'\n'; 64 << 10]);
        }
        let captured = capture.finish();
        assert!(captured.truncated);
        assert_eq!(captured.produced, 1 << 20);
        let written: u64 = captured
            .lines()
            .map(|(stream, text)| (framing + stream.to_string().len() + text.len()) as u64)
            .sum();
        let marker = (framing + "stdout".len() + cap_marker(cap).len()) as u64;
        assert!(written <= cap + marker, "{written}");
        // 46 bytes per empty line: about 22,800 lines, not a million.
        assert_eq!(captured.lines().count() as u64, cap / 46 + 1);
    }

    #[test]
    fn escaping_is_charged_and_long_lines_are_not_held() {
        // Control characters escape to four bytes each; the cap counts the escaped text.
        let mut capture = Capture::new(100, 0);
        capture.write(Stream::Stdout, &[0x01; 1000]);
        assert!(capture.truncated, "cut as soon as it cannot fit");
        assert!(capture.partial_stdout.is_empty());
        capture.write(Stream::Stdout, &[b'a'; 1 << 20]);
        assert!(
            capture.partial_stdout.capacity() < 1000,
            "nothing held once truncated"
        );
        let captured = capture.finish();
        let kept: Vec<_> = captured.lines().collect();
        // 94 bytes fit after the stream name: 23 escapes and the start of one more.
        assert_eq!(kept[0].1, format!("{}\\x", "\\x01".repeat(23)));
        assert_eq!(kept.len(), 2);
        assert_eq!(captured.emitted, 100);
    }

    #[test]
    fn messages_split_into_lines_and_respect_the_cap() {
        // "log.warn" is 8 bytes, "result" 6.
        let mut capture = Capture::new(30, 0);
        capture.message(Stream::Log(LogLevel::Warn), b"a\nb");
        capture.message(Stream::Result, b"result!!");
        let captured = capture.finish();
        let warn = Stream::Log(LogLevel::Warn);
        assert_eq!(
            lines(&captured),
            [
                (warn, "a"),
                (warn, "b"),
                (Stream::Result, "result"),
                (Stream::Result, cap_marker(30).as_str()),
            ]
        );
    }

    #[test]
    fn stream_names() {
        assert_eq!(Stream::Log(LogLevel::from_guest(1)).to_string(), "log.info");
        assert_eq!(
            Stream::Log(LogLevel::from_guest(9)).to_string(),
            "log.level9"
        );
        assert_eq!(Stream::Result.to_string(), "result");
    }
}
