//! Protocol sniffing: what a client speaks, told from its first bytes, and
//! the stream that gives those bytes back to whoever serves it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// The first bytes of an HTTP/2 connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sniffed {
    Http1,
    Http2,
    Tcp,
}

/// Classifies what a client sent first; `None` means read more.
fn classify(buf: &[u8]) -> Option<Sniffed> {
    // Servers skip empty lines before a request line (RFC 9112 2.2), so a
    // request behind them is HTTP, not opaque bytes nobody judges.
    let skip = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if skip > 0 {
        if skip >= 64 {
            return Some(Sniffed::Tcp);
        }
        return classify(&buf[skip..]);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    // An HTTP/1 request line starts with a method token and a space.
    for (i, b) in buf.iter().enumerate() {
        match b {
            b' ' if i > 0 => return Some(Sniffed::Http1),
            b'A'..=b'Z' | b'-' | b'_' if i < 20 => {}
            _ => return Some(Sniffed::Tcp),
        }
    }
    (buf.len() >= 20).then_some(Sniffed::Tcp)
}

/// Reads until the first bytes say what the client speaks (end of stream:
/// opaque TCP). What was read stays in `buf`, to be replayed.
pub(super) async fn sniff<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<Sniffed> {
    loop {
        if let Some(s) = classify(buf) {
            return Ok(s);
        }
        if io.read_buf(buf).await? == 0 {
            return Ok(Sniffed::Tcp);
        }
    }
}

/// A stream with bytes already read put back in front.
pub(super) struct Rewind<S> {
    pub(super) prefix: Bytes,
    pub(super) inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(Rewind, inner);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_http1_h2_and_tcp_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"hello"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"PRIX"), None);
        assert_eq!(classify(b"0123456789"), Some(Sniffed::Tcp));
        // Empty lines before a request line are skipped, as servers do.
        assert_eq!(
            classify(b"\r\nGET /admin HTTP/1.1\r\n"),
            Some(Sniffed::Http1)
        );
        assert_eq!(classify(b"\r\n\r\n"), None);
        assert_eq!(classify(&[b'\n'; 64]), Some(Sniffed::Tcp));
    }
}
