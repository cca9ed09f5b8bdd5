//! Every mio token of the dispatch loop, in one table. Ranges are far apart
//! so none can run into the next: a table index is below 2^23 (the worker
//! table holds a few entries per slot), a relay number below 2^22 (relays
//! are bounded by `--max-conns`, which `config::bounds` keeps far lower).
//!
//! | token                         | source                               |
//! |-------------------------------|--------------------------------------|
//! | 1                             | the supervisor's commands (waker)    |
//! | 2 + index                     | worker `index`'s channel             |
//! | 2^23 + index                  | worker `index`'s readiness probe     |
//! | 2^24 + 2 × relay + side       | a relay's client (0) or upstream (1) |
//! | 2^25 + place                  | a connection waiting for its PROXY header |
//! | 2^26 + listener               | one of lb's listeners, in configured order |

use mio::Token;

const WAKER: usize = 1;
const WORKERS: usize = 2;
const PROBES: usize = 1 << 23;
const RELAYS: usize = 1 << 24;
/// Above every relay's (below 2^24 + 2^23).
const HEADERS: usize = 1 << 25;
/// Above every header place's (`header::WAITING_MAX` is far below 2^25).
const LISTENERS: usize = 1 << 26;

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One of lb's listeners, by its place in the configuration.
    Listener(usize),
    Waker,
    /// A worker's channel, by table index.
    Worker(usize),
    /// A proxy worker's readiness probe, by table index.
    Probe(usize),
    /// One side of a relay (`side` 0 is the client, 1 the upstream).
    Relay {
        relay: usize,
        side: usize,
    },
    /// A connection waiting for its PROXY header, by its place.
    Header(usize),
}

impl Source {
    #[inline]
    pub fn of(token: Token) -> Source {
        match token.0 {
            WAKER => Source::Waker,
            t if t >= LISTENERS => Source::Listener(t - LISTENERS),
            t if t >= HEADERS => Source::Header(t - HEADERS),
            t if t >= RELAYS => Source::Relay {
                relay: (t - RELAYS) / 2,
                side: (t - RELAYS) % 2,
            },
            t if t >= PROBES => Source::Probe(t - PROBES),
            t => Source::Worker(t - WORKERS),
        }
    }

    #[inline]
    pub fn token(self) -> Token {
        Token(match self {
            Source::Listener(i) => LISTENERS + i,
            Source::Waker => WAKER,
            Source::Worker(index) => WORKERS + index,
            Source::Probe(index) => PROBES + index,
            Source::Relay { relay, side } => RELAYS + 2 * relay + side,
            Source::Header(place) => HEADERS + place,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_is_its_token_and_back() {
        for s in [
            Source::Listener(0),
            Source::Listener(63),
            Source::Waker,
            Source::Worker(0),
            Source::Worker(PROBES - WORKERS - 1),
            Source::Probe(0),
            Source::Probe(RELAYS - PROBES - 1),
            Source::Relay { relay: 0, side: 0 },
            Source::Relay { relay: 7, side: 1 },
            Source::Relay {
                relay: (1 << 22) - 1,
                side: 1,
            },
            Source::Header(0),
            Source::Header(4095),
        ] {
            assert_eq!(Source::of(s.token()), s);
        }
    }
}
