//! Guest output: capture, line splitting, escaping, the per-event cap, and sinks.
//!
//! Guest output is captured in memory while the event runs (bounded by the output cap) and
//! handed to an [`OutputSink`] line by line when the event ends, in the order the lines were
//! completed. Control characters are escaped so a guest cannot forge log lines or drive the
//! terminal of whoever reads the logs.

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

    /// Called once per event after its last line, with its outcome.
    fn finish(&mut self, _outcome: &EventOutcome) {}
}

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
    /// Bytes the guest produced, kept or not.
    produced: u64,
    /// Bytes kept (counted against the cap).
    kept: u64,
    truncated: bool,
    partial_stdout: Vec<u8>,
    partial_stderr: Vec<u8>,
    lines: Vec<(Stream, String)>,
}

impl Capture {
    pub(crate) fn new(cap: u64) -> Self {
        Self {
            cap,
            produced: 0,
            kept: 0,
            truncated: false,
            partial_stdout: Vec::new(),
            partial_stderr: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Counts `len` produced bytes; returns how many fit under the cap and whether this call
    /// reached the cap.
    fn admit(&mut self, len: usize) -> (usize, bool) {
        self.produced += len as u64;
        if self.truncated {
            return (0, false);
        }
        let room = self.cap.saturating_sub(self.kept);
        let take = room.min(len as u64);
        self.kept += take;
        let reached = take < len as u64;
        self.truncated |= reached;
        (take as usize, reached)
    }

    fn partial(&mut self, stream: Stream) -> Option<&mut Vec<u8>> {
        match stream {
            Stream::Stdout => Some(&mut self.partial_stdout),
            Stream::Stderr => Some(&mut self.partial_stderr),
            _ => None,
        }
    }

    fn flush_partial(&mut self, stream: Stream) {
        if let Some(partial) = self.partial(stream)
            && !partial.is_empty()
        {
            let text = escape(strip_cr(partial));
            partial.clear();
            self.lines.push((stream, text));
        }
    }

    /// Guest bytes written to stdout or stderr: split into lines, partial lines kept.
    pub(crate) fn write(&mut self, stream: Stream, bytes: &[u8]) {
        let (take, reached) = self.admit(bytes.len());
        let mut rest = &bytes[..take];
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(newline);
            if let Some(partial) = self.partial(stream) {
                partial.extend_from_slice(line);
            }
            self.flush_line(stream);
            rest = &tail[1..];
        }
        if let Some(partial) = self.partial(stream) {
            partial.extend_from_slice(rest);
        }
        if reached {
            self.flush_partial(stream);
            self.lines.push((stream, cap_marker(self.cap)));
        }
    }

    /// Emits the partial line of `stream` even when empty (it ended with a newline).
    fn flush_line(&mut self, stream: Stream) {
        if let Some(partial) = self.partial(stream) {
            let text = escape(strip_cr(partial));
            partial.clear();
            self.lines.push((stream, text));
        }
    }

    /// A whole message (`env.log` line or result): every line of it becomes a line on `stream`.
    pub(crate) fn message(&mut self, stream: Stream, bytes: &[u8]) {
        let (take, reached) = self.admit(bytes.len());
        if take > 0 {
            for line in bytes[..take].split(|&b| b == b'\n') {
                self.lines.push((stream, escape(strip_cr(line))));
            }
        }
        if reached {
            self.lines.push((stream, cap_marker(self.cap)));
        }
    }

    /// Ends the event: flushes partial lines and returns everything captured.
    pub(crate) fn finish(&mut self) -> Captured {
        self.flush_partial(Stream::Stdout);
        self.flush_partial(Stream::Stderr);
        Captured {
            lines: std::mem::take(&mut self.lines),
            produced: self.produced,
            truncated: self.truncated,
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What one event printed.
pub(crate) struct Captured {
    pub(crate) lines: Vec<(Stream, String)>,
    pub(crate) produced: u64,
    pub(crate) truncated: bool,
}

/// A capture buffer shared between the store's streams and host functions.
#[derive(Debug, Clone)]
pub(crate) struct SharedCapture(Arc<Mutex<Capture>>);

impl SharedCapture {
    pub(crate) fn new(cap: u64) -> Self {
        Self(Arc::new(Mutex::new(Capture::new(cap))))
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

    #[test]
    fn splits_lines_across_writes() {
        let mut capture = Capture::new(1 << 20);
        capture.write(Stream::Stdout, b"hel");
        capture.write(Stream::Stderr, b"err\r\n");
        capture.write(Stream::Stdout, b"lo\nwor");
        capture.write(Stream::Stdout, b"ld");
        let captured = capture.finish();
        assert_eq!(
            captured.lines,
            vec![
                (Stream::Stderr, "err".to_owned()),
                (Stream::Stdout, "hello".to_owned()),
                (Stream::Stdout, "world".to_owned()),
            ]
        );
        assert_eq!(captured.produced, 16);
        assert!(!captured.truncated);
    }

    #[test]
    fn cap_keeps_prefix_adds_one_marker_and_counts_everything() {
        let mut capture = Capture::new(10);
        capture.write(Stream::Stdout, b"12345\n");
        capture.write(Stream::Stdout, b"67890abc\n");
        capture.write(Stream::Stderr, b"more\n");
        capture.message(Stream::Log(LogLevel::Info), b"dropped");
        let captured = capture.finish();
        assert_eq!(
            captured.lines,
            vec![
                (Stream::Stdout, "12345".to_owned()),
                (Stream::Stdout, "6789".to_owned()),
                (Stream::Stdout, cap_marker(10)),
            ]
        );
        assert_eq!(captured.produced, 6 + 9 + 5 + 7);
        assert!(captured.truncated);
    }

    #[test]
    fn messages_split_into_lines_and_respect_the_cap() {
        let mut capture = Capture::new(8);
        capture.message(Stream::Log(LogLevel::Warn), b"a\nb");
        capture.message(Stream::Result, b"result!!");
        let captured = capture.finish();
        let warn = Stream::Log(LogLevel::Warn);
        assert_eq!(
            captured.lines,
            vec![
                (warn, "a".to_owned()),
                (warn, "b".to_owned()),
                (Stream::Result, "resul".to_owned()),
                (Stream::Result, cap_marker(8)),
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
