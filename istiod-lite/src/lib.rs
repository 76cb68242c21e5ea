//! istiod-lite: the mesh controller.
//!
//! `config` (sources of Kubernetes objects) -> `model` (workloads, services,
//! policies as xDS resources) -> `xds` (Delta ADS push); `ca` signs
//! certificates, asking the model which identities run on a node; `cluster`
//! is what a replica does against a Kubernetes API server beyond watching.

pub mod access;
pub mod app;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod crdgen;
pub mod debug;
pub mod metrics;
pub mod model;
pub mod xds;
