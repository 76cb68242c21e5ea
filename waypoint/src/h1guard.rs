//! Request framing checks hyper does not expose. hyper accepts a request
//! with both Content-Length and Transfer-Encoding (it drops the length,
//! reads chunks and closes afterwards, as RFC 9112 allows); a mesh proxy
//! must refuse it outright, since that pairing is how requests are smuggled
//! past proxies. hyper hides the dropped header, so this watches the bytes
//! hyper reads: it parses each request head with `httparse`, follows the
//! body's framing to the next head, and queues one verdict per request for
//! the service to take, in order.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// What the head of one request said about its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Ok,
    /// Content-Length and Transfer-Encoding both present.
    Conflict,
}

/// Verdicts for the requests on one connection, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Verdicts(Arc<Mutex<VecDeque<Framing>>>);

impl Verdicts {
    /// The verdict on the next request hyper hands over.
    pub fn next(&self) -> Framing {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(Framing::Ok)
    }

    fn push(&self, f: Framing) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(f);
    }
}

#[derive(Debug)]
enum Chunk {
    /// Reading a chunk-size line.
    Size(Vec<u8>),
    Data(u64),
    /// The CRLF after a chunk's data (bytes left).
    DataEnd(u8),
    /// Trailer lines after the last chunk, until an empty line.
    Trailers(Vec<u8>),
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Fixed(u64),
    Chunked(Chunk),
    /// Something hyper will refuse (a conflict, an oversized or malformed
    /// head): stop watching.
    Done,
}

/// Scans request bytes as they are read.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    max_head: usize,
    verdicts: Verdicts,
}

const MAX_HEADERS: usize = 128;

impl Scanner {
    pub fn new(max_head: usize, verdicts: Verdicts) -> Scanner {
        Scanner {
            state: State::Head(Vec::new()),
            max_head,
            verdicts,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let state = std::mem::replace(&mut self.state, State::Done);
            let (next, used) = self.step(state, data);
            self.state = next;
            if matches!(self.state, State::Done) {
                return;
            }
            data = &data[used..];
        }
    }

    fn step(&mut self, state: State, data: &[u8]) -> (State, usize) {
        match state {
            State::Done => (State::Done, data.len()),
            State::Head(mut buf) => {
                let before = buf.len();
                buf.extend_from_slice(data);
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let used = n - before;
                        let has = |name: &str| {
                            req.headers
                                .iter()
                                .any(|h| h.name.eq_ignore_ascii_case(name))
                        };
                        let te = has("transfer-encoding");
                        let cl = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| {
                                std::str::from_utf8(h.value)
                                    .ok()?
                                    .trim()
                                    .parse::<u64>()
                                    .ok()
                            });
                        if te && has("content-length") {
                            self.verdicts.push(Framing::Conflict);
                            return (State::Done, used);
                        }
                        self.verdicts.push(Framing::Ok);
                        // An Upgrade is never answered 101 here (the header
                        // is hop-by-hop and stripped), so the connection
                        // stays HTTP/1 and is watched on.
                        let next = if te {
                            State::Chunked(Chunk::Size(Vec::new()))
                        } else {
                            match cl {
                                Some(0) | None => State::Head(Vec::new()),
                                Some(n) => State::Fixed(n),
                            }
                        };
                        (next, used)
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= self.max_head => {
                        (State::Head(buf), data.len())
                    }
                    // Oversized or malformed: hyper answers 431 or 400.
                    _ => (State::Done, data.len()),
                }
            }
            State::Fixed(left) => {
                let n = (data.len() as u64).min(left);
                let next = if n == left {
                    State::Head(Vec::new())
                } else {
                    State::Fixed(left - n)
                };
                (next, n as usize)
            }
            State::Chunked(c) => {
                let (c, used) = step_chunk(c, data);
                (
                    c.map(State::Chunked).unwrap_or(State::Head(Vec::new())),
                    used,
                )
            }
        }
    }
}

/// One step through a chunked body; `None` when the body has ended.
fn step_chunk(c: Chunk, data: &[u8]) -> (Option<Chunk>, usize) {
    match c {
        Chunk::Size(mut line) => match data.iter().position(|b| *b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&data[..=i]);
                match httparse::parse_chunk_size(&line) {
                    Ok(httparse::Status::Complete((_, 0))) => {
                        (Some(Chunk::Trailers(Vec::new())), i + 1)
                    }
                    Ok(httparse::Status::Complete((_, n))) => (Some(Chunk::Data(n)), i + 1),
                    // hyper refuses the body; nothing more to watch.
                    _ => (Some(Chunk::Size(Vec::new())), data.len()),
                }
            }
            None => {
                line.extend_from_slice(data);
                (Some(Chunk::Size(line)), data.len())
            }
        },
        Chunk::Data(left) => {
            let n = (data.len() as u64).min(left);
            let next = if n == left {
                Chunk::DataEnd(2)
            } else {
                Chunk::Data(left - n)
            };
            (Some(next), n as usize)
        }
        Chunk::DataEnd(left) => {
            let n = data.len().min(usize::from(left));
            let next = if n == usize::from(left) {
                Chunk::Size(Vec::new())
            } else {
                Chunk::DataEnd(left - n as u8)
            };
            (Some(next), n)
        }
        Chunk::Trailers(mut line) => match data.iter().position(|b| *b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&data[..=i]);
                if line == b"\r\n" || line == b"\n" {
                    (None, i + 1)
                } else {
                    (Some(Chunk::Trailers(Vec::new())), i + 1)
                }
            }
            None => {
                line.extend_from_slice(data);
                (Some(Chunk::Trailers(line)), data.len())
            }
        },
    }
}

/// The downstream connection, with every byte read shown to the scanner.
pub struct Guarded<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, scanner: Scanner) -> Self {
        Guarded { inner, scanner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            self.scanner.feed(&buf.filled()[before..]);
        }
        r
    }
}

forward_async_write!(Guarded, inner);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[&[u8]]) -> Vec<Framing> {
        let v = Verdicts::default();
        let mut s = Scanner::new(64 * 1024, v.clone());
        for part in input {
            s.feed(part);
        }
        let mut out = Vec::new();
        while let Some(f) = v.0.lock().unwrap().pop_front() {
            out.push(f);
        }
        out
    }

    #[test]
    fn follows_bodies_to_each_next_head() {
        let pipelined: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(verdicts(&[pipelined]), vec![Framing::Ok; 3]);
        // Byte by byte, the same.
        let bytes: Vec<&[u8]> = pipelined.chunks(1).collect();
        assert_eq!(verdicts(&bytes), vec![Framing::Ok; 3]);
    }

    #[test]
    fn content_length_with_transfer_encoding_is_a_conflict_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"[..],
        ] {
            assert_eq!(verdicts(&[head]), vec![Framing::Conflict]);
        }
        let second: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(verdicts(&[second]), vec![Framing::Ok, Framing::Conflict]);
    }
}
