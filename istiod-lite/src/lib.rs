//! istiod-lite: the mesh controller.
//!
//! Today: the CA (`ca`). The config model and Delta ADS push build on it.

pub mod ca;
