//! A `DeltaDiscoveryResponse` made of the model's shared resources, and
//! the gRPC response body that encodes it lazily: a chunk at a time, as
//! HTTP/2 flow control lets the proxy take it. A connection never holds a
//! copy of a resource, nor a whole encoded response (a first push to a
//! proxy is the whole mesh: megabytes, times every proxy connecting at once).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Frame;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;

use super::queue::QueueRx;
use crate::model::XdsResource;

/// `DeltaDiscoveryResponse` fields.
const SYSTEM_VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;
const REMOVED_RESOURCES: u32 = 6;

/// Bytes handed to HTTP/2 at a time.
const CHUNK: usize = 64 * 1024;

/// One response, as sent: the resources are the model's own.
#[derive(Debug, Default)]
pub struct Response {
    pub system_version_info: String,
    pub type_url: String,
    pub nonce: String,
    pub resources: Vec<Arc<XdsResource>>,
    pub removed: Vec<Arc<str>>,
}

fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }
}

fn put_str(buf: &mut BytesMut, tag: u32, s: &str) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

fn resource_len(r: &XdsResource) -> usize {
    let n = r.wire().len();
    key_len(RESOURCES) + encoded_len_varint(n as u64) + n
}

impl Response {
    /// The encoded message's length.
    pub fn encoded_len(&self) -> usize {
        str_len(SYSTEM_VERSION_INFO, &self.system_version_info)
            + self
                .resources
                .iter()
                .map(|r| resource_len(r))
                .sum::<usize>()
            + str_len(TYPE_URL, &self.type_url)
            + str_len(NONCE, &self.nonce)
            + self
                .removed
                .iter()
                .map(|n| key_len(REMOVED_RESOURCES) + encoded_len_varint(n.len() as u64) + n.len())
                .sum::<usize>()
    }

    /// The whole gRPC frame at once (for tests; the body encodes lazily).
    pub fn encode_frame(self) -> Bytes {
        let mut e = Encoding::new(self);
        let mut out = BytesMut::new();
        while let Some(b) = e.next_chunk() {
            out.put_slice(&b);
        }
        out.freeze()
    }
}

/// A response being encoded: the gRPC frame header and the leading
/// field, then each resource, then the trailing fields.
struct Encoding {
    head: Option<Bytes>,
    resources: std::vec::IntoIter<Arc<XdsResource>>,
    tail: Option<Bytes>,
}

impl Encoding {
    fn new(r: Response) -> Encoding {
        let len = r.encoded_len();
        let mut head = BytesMut::with_capacity(5 + 64);
        head.put_u8(0); // not compressed
        head.put_u32(len as u32);
        put_str(&mut head, SYSTEM_VERSION_INFO, &r.system_version_info);
        let mut tail = BytesMut::new();
        put_str(&mut tail, TYPE_URL, &r.type_url);
        put_str(&mut tail, NONCE, &r.nonce);
        for n in &r.removed {
            encode_key(REMOVED_RESOURCES, WireType::LengthDelimited, &mut tail);
            encode_varint(n.len() as u64, &mut tail);
            tail.put_slice(n.as_bytes());
        }
        Encoding {
            head: Some(head.freeze()),
            resources: r.resources.into_iter(),
            tail: Some(tail.freeze()),
        }
    }

    /// Up to about [`CHUNK`] bytes of the frame; None once it is all out.
    fn next_chunk(&mut self) -> Option<Bytes> {
        let mut buf = BytesMut::with_capacity(CHUNK);
        if let Some(h) = self.head.take() {
            buf.put_slice(&h);
        }
        while buf.len() < CHUNK {
            let Some(r) = self.resources.next() else {
                break;
            };
            encode_key(RESOURCES, WireType::LengthDelimited, &mut buf);
            encode_varint(r.wire().len() as u64, &mut buf);
            buf.put_slice(r.wire());
        }
        if buf.len() < CHUNK
            && self.resources.len() == 0
            && let Some(t) = self.tail.take()
        {
            buf.put_slice(&t);
        }
        (!buf.is_empty()).then(|| buf.freeze())
    }
}

/// Why a connection's task ended its stream: set before it drops its
/// sender, read once the responses are all out. Unset: a clean end.
pub type End = Arc<std::sync::Mutex<Option<Status>>>;

/// The response stream of one connection: responses from its task,
/// encoded as HTTP/2 asks for data, then the `grpc-status` trailer (the
/// task's [`End`], so a proxy cut off for cause sees why and backs off).
pub struct ResponseBody {
    rx: QueueRx,
    end: End,
    /// The response being encoded, and its share of the queue's bytes.
    current: Option<(Encoding, OwnedSemaphorePermit)>,
    done: bool,
}

impl ResponseBody {
    pub fn new(rx: QueueRx, end: End) -> ResponseBody {
        ResponseBody {
            rx,
            end,
            current: None,
            done: false,
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some((e, _)) = this.current.as_mut() {
                match e.next_chunk() {
                    Some(b) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                    None => this.current = None,
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(q)) => {
                    this.current = Some((Encoding::new(q.response), q.permit));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let status = this
                        .end
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .unwrap_or_else(|| Status::ok(""));
                    let mut trailers = http::HeaderMap::new();
                    if let Err(s) = status.add_header(&mut trailers) {
                        return Poll::Ready(Some(Err(s)));
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.current.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
    use prost::Message;

    fn resource(i: usize, size: usize) -> Arc<XdsResource> {
        Arc::new(XdsResource::new(
            "type.googleapis.com/x.Y",
            format!("ns/r-{i}").into(),
            &vec![i as u8; size],
            1,
        ))
    }

    #[test]
    fn a_response_decodes_as_the_protocol_message() {
        // Large enough to span several chunks.
        let resources: Vec<_> = (0..400).map(|i| resource(i, 700)).collect();
        let r = Response {
            system_version_info: "7".into(),
            type_url: "type.googleapis.com/x.Y".into(),
            nonce: "3-9".into(),
            resources: resources.clone(),
            removed: vec!["ns/gone".into(), "ns/also".into()],
        };
        let len = r.encoded_len();
        let frame = r.encode_frame();
        assert!(frame.len() > 4 * CHUNK);
        assert_eq!(frame[0], 0);
        assert_eq!(
            u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize,
            len
        );
        assert_eq!(frame.len(), 5 + len);
        let d = DeltaDiscoveryResponse::decode(&frame[5..]).expect("decodes");
        assert_eq!(d.system_version_info, "7");
        assert_eq!(d.type_url, "type.googleapis.com/x.Y");
        assert_eq!(d.nonce, "3-9");
        assert_eq!(d.removed_resources, vec!["ns/gone", "ns/also"]);
        assert_eq!(d.resources.len(), 400);
        for (got, want) in d.resources.iter().zip(&resources) {
            assert_eq!(got.name, &*want.name);
            assert_eq!(got.resource.as_ref().expect("payload").value, want.value());
        }
    }

    #[test]
    fn an_empty_response_is_an_empty_message() {
        let frame = Response {
            type_url: "t".into(),
            nonce: "1-1".into(),
            ..Default::default()
        }
        .encode_frame();
        let d = DeltaDiscoveryResponse::decode(&frame[5..]).expect("decodes");
        assert!(d.resources.is_empty() && d.removed_resources.is_empty());
        assert_eq!(d.nonce, "1-1");
    }
}
