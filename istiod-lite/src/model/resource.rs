//! One xDS resource as the model keeps it: encoded once, as the Delta xDS
//! `Resource` message it is sent in, and shared (never copied) by every
//! connection that sends it.

use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// `Resource.version`, `Resource.resource` (an `Any`), `Resource.name`;
/// `Any.type_url`, `Any.value`.
const VERSION: u32 = 1;
const ANY: u32 = 2;
const NAME: u32 = 3;
const TYPE_URL: u32 = 1;
const VALUE: u32 = 2;

/// The wire form of a version: 16 hex digits.
pub const VERSION_LEN: usize = 16;

/// One xDS resource.
#[derive(Debug)]
pub struct XdsResource {
    /// Shared with the model's index and every connection that holds it.
    pub name: Arc<str>,
    /// The first 64 bits of the SHA-256 of the payload: an unchanged
    /// resource keeps its version across restarts.
    pub version: u64,
    /// The model generation that made it ([`super::Model::generation`]).
    pub generation: u64,
    /// The whole `envoy.service.discovery.v3.Resource` message.
    wire: Bytes,
    /// Where the payload (the `Any`'s value) lies in `wire`.
    value: Range<usize>,
}

/// A payload's version.
pub fn version_of(bytes: &[u8]) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// A version as sent: 16 hex digits.
pub fn version_text(v: u64) -> String {
    format!("{v:016x}")
}

fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_field(buf: &mut BytesMut, tag: u32, bytes: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

impl XdsResource {
    /// Encodes a payload of type `type_url` under `name`.
    pub fn new(type_url: &str, name: Arc<str>, payload: &[u8], generation: u64) -> XdsResource {
        let version = version_of(payload);
        let any_len = field_len(TYPE_URL, type_url.len()) + field_len(VALUE, payload.len());
        let len =
            field_len(VERSION, VERSION_LEN) + field_len(ANY, any_len) + field_len(NAME, name.len());
        let mut buf = BytesMut::with_capacity(len);
        put_field(&mut buf, VERSION, version_text(version).as_bytes());
        encode_key(ANY, WireType::LengthDelimited, &mut buf);
        encode_varint(any_len as u64, &mut buf);
        put_field(&mut buf, TYPE_URL, type_url.as_bytes());
        encode_key(VALUE, WireType::LengthDelimited, &mut buf);
        encode_varint(payload.len() as u64, &mut buf);
        let start = buf.len();
        buf.put_slice(payload);
        let value = start..buf.len();
        put_field(&mut buf, NAME, name.as_bytes());
        debug_assert_eq!(buf.len(), len);
        XdsResource {
            name,
            version,
            generation,
            wire: buf.freeze(),
            value,
        }
    }

    /// The payload: the encoded message of the resource's type.
    pub fn value(&self) -> &[u8] {
        &self.wire[self.value.clone()]
    }

    /// The encoded `Resource` message (a cheap, shared handle).
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::envoy::service::discovery::v3::Resource;
    use prost::Message;

    #[test]
    fn the_wire_form_is_the_resource_message() {
        let payload = vec![7u8; 300];
        let r = XdsResource::new("type.googleapis.com/x.Y", "ns/a".into(), &payload, 3);
        let decoded = Resource::decode(r.wire().clone()).expect("decodes");
        assert_eq!(decoded.name, "ns/a");
        assert_eq!(decoded.version, version_text(r.version));
        assert_eq!(decoded.version.len(), VERSION_LEN);
        let any = decoded.resource.expect("has a payload");
        assert_eq!(any.type_url, "type.googleapis.com/x.Y");
        assert_eq!(any.value, payload);
        assert_eq!(r.value(), payload.as_slice());
        // Same payload, same version; another payload, another.
        let again = XdsResource::new("type.googleapis.com/x.Y", "ns/b".into(), &payload, 4);
        assert_eq!(again.version, r.version);
        let other = XdsResource::new("type.googleapis.com/x.Y", "ns/a".into(), &[1], 5);
        assert_ne!(other.version, r.version);
    }
}
