//! The waypoint: opt-in L7 for a namespace. Not built yet (issue #6); it will
//! reuse the `ztunnel` crate's identity, TLS and HBONE pieces.
