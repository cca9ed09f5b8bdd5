//! The little HTTP the metrics listener speaks: a request head read
//! without blocking and bounded, routed by its request line, and whole
//! answers (`Connection: close`) written without waiting. Hand-written on
//! purpose: the listener's promises (a deadline per client, a bound on
//! waiting clients and on the head, never blocking) are its event loop's,
//! and what it parses is one request line.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;

/// Longest request head accepted (request line and headers).
pub(super) const MAX_HEAD: usize = 8 * 1024;
/// What is read of a client's further bytes before an error answer is
/// closed (so that the close is a FIN rather than a reset that could
/// discard the answer).
const MAX_DRAIN: usize = 64 * 1024;

/// How far a client's head has come.
#[derive(Debug, PartialEq)]
pub(super) enum Progress {
    More,
    /// The head (or what came before EOF).
    Head(Vec<u8>),
    TooLong,
    Gone,
}

/// What the listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `/metrics`: the Prometheus text exposition.
    Metrics,
    /// `/livez` (alias `/healthz`): the supervisor answers.
    Live,
    /// `/readyz`: enough workers are ready, and lb is not stopping.
    Ready,
}

/// Every path served, for the 404's answer.
const PATHS: &str = "/metrics, /livez (or /healthz) and /readyz";

/// What a head asks for.
#[derive(Debug, PartialEq)]
pub(super) enum Route {
    /// GET (or, without the body, HEAD) one of the endpoints.
    Get { endpoint: Endpoint, head_only: bool },
    /// An answer that needs no supervisor.
    Error(Answer),
}

/// An HTTP answer; `head_only` leaves out the body (for HEAD).
#[derive(Debug, PartialEq)]
pub(super) struct Answer {
    pub code: &'static str,
    pub headers: &'static str,
    pub content_type: &'static str,
    pub body: String,
    pub head_only: bool,
}

pub(super) const TEXT: &str = "text/plain; charset=utf-8";
pub(super) const EXPOSITION: &str = "text/plain; version=0.0.4";

impl Answer {
    pub fn error(code: &'static str, body: String) -> Answer {
        Answer {
            code,
            headers: "",
            content_type: TEXT,
            body,
            head_only: false,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.code,
            self.content_type,
            self.body.len(),
            self.headers
        );
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// Where a request head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    crlf.into_iter().chain(lf).min()
}

/// Reads what is there without blocking, up to the end of the head (EOF
/// ends one too).
pub(super) fn read_head(mut stream: &TcpStream, buf: &mut Vec<u8>) -> Progress {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Progress::Gone,
            Ok(0) => return Progress::Head(std::mem::take(buf)),
            Ok(n) => {
                // The blank line may straddle two reads.
                let from = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = head_end(&buf[from..]) {
                    buf.truncate(from + end);
                    return if buf.len() > MAX_HEAD {
                        Progress::TooLong
                    } else {
                        Progress::Head(std::mem::take(buf))
                    };
                }
                if buf.len() > MAX_HEAD {
                    return Progress::TooLong;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Progress::Gone,
        }
    }
}

/// What a request head asks for; only its request line matters.
pub(super) fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Route::Error(Answer::error(
            "400 Bad Request",
            "not an HTTP request line; GET /metrics\n".into(),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Error(Answer::error(
            "400 Bad Request",
            "HTTP/1.x only; GET /metrics\n".into(),
        ));
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut answer = Answer::error(
            "405 Method Not Allowed",
            format!("{PATHS} are read with GET or HEAD, not {method}\n"),
        );
        answer.headers = "Allow: GET, HEAD\r\n";
        return Route::Error(answer);
    }
    let endpoint = match target.split('?').next() {
        Some("/metrics") => Endpoint::Metrics,
        Some("/livez" | "/healthz") => Endpoint::Live,
        Some("/readyz") => Endpoint::Ready,
        _ => {
            let mut answer = Answer::error("404 Not Found", format!("lb serves {PATHS}\n"));
            answer.head_only = head_only;
            return Route::Error(answer);
        }
    };
    Route::Get {
        endpoint,
        head_only,
    }
}

/// An answer to a client the loop is done with, without waiting: nothing
/// was written to it before, so a short answer fits in the socket's
/// buffer; if not, or if the client is gone, it goes unsaid. What the
/// client sent beyond its head is read (a little) so that closing does
/// not reset the connection before the answer is read.
pub(super) fn reply_now(stream: &TcpStream, answer: &Answer) {
    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
    let _ = nix::sys::socket::send(stream.as_raw_fd(), &answer.bytes(), flags);
    let _ = stream.shutdown(Shutdown::Write);
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_DRAIN {
        match (&*stream).read(&mut chunk) {
            Ok(n) if n > 0 => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;

    fn answer(code: &'static str, head_only: bool) -> impl Fn(&Route) -> bool {
        move |r| matches!(r, Route::Error(a) if a.code.starts_with(code) && a.head_only == head_only)
    }

    #[test]
    fn a_head_routes_by_its_request_line() {
        let metrics = |head_only| Route::Get {
            endpoint: Endpoint::Metrics,
            head_only,
        };
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            metrics(false)
        );
        assert_eq!(route(b"GET /metrics?a=b HTTP/1.0\n\n"), metrics(false));
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), metrics(true));
        let get = |endpoint| Route::Get {
            endpoint,
            head_only: false,
        };
        assert_eq!(route(b"GET /livez HTTP/1.1\r\n\r\n"), get(Endpoint::Live));
        assert_eq!(route(b"GET /healthz HTTP/1.0\r\n\r\n"), get(Endpoint::Live));
        assert_eq!(
            route(b"GET /readyz?verbose HTTP/1.1\r\n\r\n"),
            get(Endpoint::Ready)
        );
        assert_eq!(
            route(b"HEAD /readyz HTTP/1.1\r\n\r\n"),
            Route::Get {
                endpoint: Endpoint::Ready,
                head_only: true
            }
        );
        for refused in [
            &b"POST /readyz HTTP/1.1\r\n\r\n"[..],
            b"PUT /livez HTTP/1.1\r\n\r\n",
            b"DELETE /healthz HTTP/1.1\r\n\r\n",
        ] {
            let Route::Error(a) = route(refused) else {
                panic!("{refused:?} routed")
            };
            assert!(a.code.starts_with("405"), "{a:?}");
            assert_eq!(a.headers, "Allow: GET, HEAD\r\n");
        }
        for elsewhere in ["/", "/health", "/ready", "/livezz", "/metrics/x"] {
            let head = format!("GET {elsewhere} HTTP/1.1\r\n\r\n");
            assert!(answer("404", false)(&route(head.as_bytes())), "{elsewhere}");
        }
        assert!(answer("404", false)(&route(b"GET / HTTP/1.1\r\n\r\n")));
        assert!(answer("404", true)(&route(b"HEAD /x HTTP/1.1\r\n\r\n")));
        assert!(answer("405", false)(&route(
            b"POST /metrics HTTP/1.1\r\n\r\n"
        )));
        assert!(answer("400", false)(&route(b"PRI * HTTP/2.0\r\n\r\n")));
        assert!(answer("400", false)(&route(b"GET /metrics\r\n\r\n")));
        assert!(answer("400", false)(&route(b"\xff\xfe\r\n\r\n")));
        assert!(answer("400", false)(&route(b"")));
    }

    #[test]
    fn an_answer_is_a_whole_http_response() {
        let mut a = Answer::error("405 Method Not Allowed", "no\n".into());
        a.headers = "Allow: GET, HEAD\r\n";
        assert_eq!(
            String::from_utf8(a.bytes()).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 3\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\nno\n"
        );
        a.head_only = true;
        assert!(
            String::from_utf8(a.bytes())
                .unwrap()
                .ends_with("Content-Length: 3\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n")
        );
    }

    #[test]
    fn the_end_of_a_head_is_its_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    /// A connected pair of TCP streams on loopback.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    /// Waits until `server` has `n` bytes to read.
    fn settle(server: &TcpStream, n: usize) {
        let mut probe = vec![0u8; n];
        for _ in 0..200 {
            if server.peek(&mut probe).is_ok_and(|got| got >= n) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{n} bytes never arrived");
    }

    #[test]
    fn a_head_is_read_across_reads_and_bounded() {
        let (mut client, server) = pair();
        let mut buf = Vec::new();
        assert_eq!(read_head(&server, &mut buf), Progress::More);
        client.write_all(b"GET /metrics HTTP/1.1\r\n\r").unwrap();
        settle(&server, 24);
        assert_eq!(read_head(&server, &mut buf), Progress::More);
        client.write_all(b"\nafter").unwrap();
        settle(&server, 6);
        assert_eq!(
            read_head(&server, &mut buf),
            Progress::Head(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec())
        );

        let (mut client, server) = pair();
        let mut buf = Vec::new();
        let long = vec![b'a'; MAX_HEAD + 1];
        client.write_all(&long).unwrap();
        settle(&server, long.len());
        assert_eq!(read_head(&server, &mut buf), Progress::TooLong);

        // EOF ends a head (what came so far); nothing at all is no request.
        let (mut client, server) = pair();
        client.write_all(b"GET /metrics HTTP/1.0\r\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        settle(&server, 23);
        let mut buf = Vec::new();
        let mut got = read_head(&server, &mut buf);
        for _ in 0..100 {
            if got != Progress::More {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            got = read_head(&server, &mut buf);
        }
        assert_eq!(got, Progress::Head(b"GET /metrics HTTP/1.0\r\n".to_vec()));
        let (client, server) = pair();
        drop(client);
        let mut got = Progress::More;
        for _ in 0..100 {
            got = read_head(&server, &mut Vec::new());
            if got != Progress::More {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got, Progress::Gone);
    }
}
