//! One log line, as text or as a JSON object: lb's own lines and the
//! workers' output lines share the layout, whichever sink they go to.
//!
//! Text: `2026-12-02T00:04:35.123Z INFO  lb: listening on …`, with
//! `pool=NAME` before the text of lines about a worker; JSON: one object a
//! line (`time`, `level`, then `msg` and, about a worker, `slot`, `pid`,
//! `pool`; a worker's line has `stream` and `line` instead of `msg`).
//! serde_json does the JSON (escaping included), humantime the RFC 3339
//! timestamps (UTC, milliseconds).

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;
use std::time::SystemTime;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn text(self) -> &'static str {
        match self {
            Level::Info => "INFO ",
            Level::Warn => "WARN ",
            Level::Error => "ERROR",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    /// sd-daemon(3)'s prefix: journald takes the line's priority from it.
    fn syslog(self) -> &'static str {
        match self {
            Level::Info => "<6>",
            Level::Warn => "<4>",
            Level::Error => "<3>",
        }
    }
}

/// The worker a line is about.
#[derive(Debug, Clone, Copy)]
pub struct About<'a> {
    pub slot: usize,
    /// `None` for a slot's line that is about no process (a restart).
    pub pid: Option<u32>,
    pub pool: &'a str,
}

/// How one sink's lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub json: bool,
    pub timestamps: bool,
    /// The sink is journald's stream: a `<N>` priority prefix leads.
    pub journal: bool,
}

impl Style {
    pub const TEXT: Style = Style {
        json: false,
        timestamps: true,
        journal: false,
    };
}

/// The worker's output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

fn now() -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(SystemTime::now())
}

#[derive(Serialize)]
struct MasterJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    level: &'static str,
    msg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<&'a str>,
}

#[derive(Serialize)]
struct WorkerJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    level: &'static str,
    slot: usize,
    pid: u32,
    pool: &'a str,
    stream: &'static str,
    line: &'a str,
}

/// Timestamp, level and pool: what leads a text line.
fn text_head(out: &mut Vec<u8>, style: Style, level: Level, pool: Option<&str>) {
    if style.journal {
        out.extend_from_slice(level.syslog().as_bytes());
    }
    if style.timestamps {
        let _ = write!(out, "{} ", now());
    }
    out.extend_from_slice(level.text().as_bytes());
    out.push(b' ');
    if let Some(pool) = pool {
        let _ = write!(out, "pool={pool} ");
    }
}

/// One of lb's own lines, with its newline.
pub fn master(
    style: Style,
    level: Level,
    about: Option<&About<'_>>,
    msg: fmt::Arguments,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    if style.json {
        let msg: Cow<'_, str> = match msg.as_str() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(msg.to_string()),
        };
        let record = MasterJson {
            time: style.timestamps.then(|| now().to_string()),
            level: level.json(),
            msg: &msg,
            slot: about.map(|a| a.slot),
            pid: about.and_then(|a| a.pid),
            pool: about.map(|a| a.pool),
        };
        let _ = serde_json::to_writer(&mut out, &record);
    } else {
        text_head(&mut out, style, level, about.map(|a| a.pool));
        let _ = write!(out, "lb: {msg}");
    }
    out.push(b'\n');
    out
}

/// One line a worker wrote (without its newline), with lb's newline.
pub fn worker(style: Style, about: &About<'_>, stream: Stream, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 96);
    if style.json {
        let line = String::from_utf8_lossy(line);
        let record = WorkerJson {
            time: style.timestamps.then(|| now().to_string()),
            level: Level::Info.json(),
            slot: about.slot,
            pid: about.pid.unwrap_or_default(),
            pool: about.pool,
            stream: stream.name(),
            line: &line,
        };
        let _ = serde_json::to_writer(&mut out, &record);
    } else {
        text_head(&mut out, style, Level::Info, Some(about.pool));
        let marker = if stream == Stream::Stderr {
            " stderr"
        } else {
            ""
        };
        // No carriage return or terminal escape can make it look like lb's own.
        let _ = write!(
            out,
            "[worker {} pid {}{marker}] {}",
            about.slot,
            about.pid.unwrap_or_default(),
            escape(line)
        );
    }
    out.push(b'\n');
    out
}

/// Text a worker sent, made safe for a log line: control characters (a
/// newline that would start a forged `lb:` line, a carriage return, a
/// terminal escape) are written as `\n`, `\r`, `\x1b`…, invalid UTF-8 as
/// U+FFFD. Tabs stay.
pub fn escape(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: About<'static> = About {
        slot: 3,
        pid: Some(4242),
        pool: "web",
    };

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_worker_cannot_forge_or_garble_a_line() {
        let forged = b"ok\nlb: worker 0 pid 1 gen 1: exit (killed by SIGKILL)\r\x1b[2K\tend";
        assert_eq!(
            escape(forged),
            "ok\\nlb: worker 0 pid 1 gen 1: exit (killed by SIGKILL)\\r\\x1b[2K\tend"
        );
        assert_eq!(escape("plain, ünïcode".as_bytes()), "plain, ünïcode");
        assert_eq!(escape(b"\xff"), "\u{fffd}");
    }

    #[test]
    fn text_lines_lead_with_an_rfc3339_time_and_a_level() {
        let line = text(master(
            Style::TEXT,
            Level::Warn,
            None,
            format_args!("x {}", 1),
        ));
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{line}");
        assert!(time.ends_with('Z') && time.len() == 24, "{line}");
        assert_eq!(rest, "WARN  lb: x 1\n");
        let line = text(master(
            Style::TEXT,
            Level::Info,
            Some(&WEB),
            format_args!("m"),
        ));
        assert!(line.ends_with(" INFO  pool=web lb: m\n"), "{line}");
    }

    #[test]
    fn without_timestamps_and_for_the_journal() {
        let bare = Style {
            timestamps: false,
            ..Style::TEXT
        };
        let line = text(master(bare, Level::Error, None, format_args!("gone")));
        assert_eq!(line, "ERROR lb: gone\n");
        let journal = Style {
            journal: true,
            ..bare
        };
        let line = text(worker(journal, &WEB, Stream::Stderr, b"oops\r"));
        assert_eq!(
            line,
            "<6>INFO  pool=web [worker 3 pid 4242 stderr] oops\\r\n"
        );
        let line = text(master(journal, Level::Warn, None, format_args!("w")));
        assert_eq!(line, "<4>WARN  lb: w\n");
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let json = Style {
            json: true,
            ..Style::TEXT
        };
        let line = text(master(
            json,
            Level::Info,
            Some(&WEB),
            format_args!("a \"b\"\n"),
        ));
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["msg"], "a \"b\"\n");
        assert_eq!(v["level"], "info");
        assert_eq!(
            (v["slot"].as_u64(), v["pid"].as_u64()),
            (Some(3), Some(4242))
        );
        assert_eq!(v["pool"], "web");
        assert!(humantime::parse_rfc3339(v["time"].as_str().unwrap()).is_ok());

        let line = text(worker(json, &WEB, Stream::Stdout, b"GET /\x1b \xff"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["line"], "GET /\x1b \u{fffd}");
        assert_eq!(v["stream"], "stdout");
        assert!(v.get("msg").is_none());

        let untimed = Style {
            timestamps: false,
            ..json
        };
        let line = text(master(untimed, Level::Error, None, format_args!("x")));
        assert_eq!(line, "{\"level\":\"error\",\"msg\":\"x\"}\n");
    }
}
