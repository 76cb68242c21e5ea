//! meshctl: see and steer the mesh from a terminal.
//!
//! `source` reaches the proxies and the controller (by address, through a
//! lab's network namespaces, or a saved dump); each command module turns
//! what they report into tables (`output`). `why` runs the ztunnel's own
//! decision code on the state a ztunnel reports.

pub mod check;
pub mod cluster;
pub mod config_view;
pub mod kube_pods;
pub mod manage;
pub mod output;
pub mod source;
pub mod top;
pub mod version;
pub mod why;
