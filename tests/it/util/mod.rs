//! Shared helpers for the integration tests: start the real `lb` binary,
//! read its log, talk HTTP to it, and always end what was started, by pid.
//! One file per concern; everything is re-exported here, so a test says
//! `use crate::util::*;`.

// Each test file uses its own few of these.
#![allow(dead_code)]

mod config;
mod ctl;
mod http;
pub mod load;
mod process;
mod scenarios;
mod workers;

pub use config::*;
pub use http::*;
pub use process::*;
pub use scenarios::*;
pub use workers::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn lb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb")
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port free now (for what must be told its port before it
/// binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to `127.0.0.1:port` as soon as something listens there (within
/// `WAIT`): `systemd-socket-activate` starts its program only at a first
/// connection, as systemd does for a socket unit whose service is not
/// running.
pub fn first_connection(port: u16) -> std::thread::JoinHandle<std::net::TcpStream> {
    std::thread::spawn(move || {
        let end = std::time::Instant::now() + WAIT;
        loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => return c,
                Err(e) if std::time::Instant::now() > end => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
