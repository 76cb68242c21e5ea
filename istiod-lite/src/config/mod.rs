//! Config sources: what users write (Kubernetes objects), from a folder or
//! the Kubernetes API, into one stream of changes.

pub mod crds;
pub mod folder;
pub mod grpcroute;
pub mod kube;
pub mod mesh;
pub mod names;
pub mod objects;
pub mod sources;
