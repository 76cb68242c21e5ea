//! The mesh's shared core: what the ztunnel, the waypoint, the controller,
//! the node agent and `meshctl` all build on. No binary lives here, and this
//! crate depends on no other crate of the mesh but the wire types.
//!
//! Layering (a module only uses those listed before it):
//! `loglimit` -> `identity` -> `lab_file` -> `clock` -> `config` -> `tls` -> `ca` ->
//! `certs` -> `state` -> `xds` -> `metrics` -> `netns` -> `route` ->
//! `spin` -> `shards` -> `socket` -> `listen` -> `hbone` -> `zds` -> `admin` -> `logging` ->
//! `app`.

pub mod admin;
pub mod app;
pub mod ca;
pub mod certs;
pub mod clock;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod lab_file;
pub mod listen;
pub mod logging;
pub mod loglimit;
pub mod metrics;
pub mod netns;
pub mod route;
pub mod shards;
pub mod socket;
pub mod spin;
pub mod state;
pub mod tls;
pub mod xds;
pub mod zds;

pub use logging::init_logging;
