//! Test harnesses for the end-to-end suite: real processes, real sockets,
//! real TLS. (The network-namespace lab lands here too.)

pub mod as_user;
pub mod ca;
pub mod controller;
pub mod envoy;
pub mod extauthz;
pub mod fake_ads;
pub mod kubelet;
pub mod lab;
pub mod mesh;
pub mod netns;
pub mod procfs;
pub mod promql;
pub mod pytools;
