//! istiod-lite: the mesh controller.
//!
//! `config` (sources of Kubernetes objects) -> `model` (workloads, services,
//! policies as xDS resources) -> `xds` (Delta ADS push); `ca` signs
//! certificates, asking the model which identities run on a node.

pub mod app;
pub mod ca;
pub mod config;
pub mod crdgen;
pub mod model;
pub mod xds;
