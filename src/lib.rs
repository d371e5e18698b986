//! eventwire: a proxy-wasm filter that publishes HTTP requests as CloudEvents through the
//! eventwire sidecar to Kafka.
//!
//! Everything but `shell` is host-free, so it is unit-tested natively and in wasm under
//! `wasm-bindgen-test`: `stream` decides what happens to each request and reaches the proxy
//! only through the `host::Host` trait; `shell` is the thin proxy-wasm layer that implements
//! that trait, compiled only with the default `proxy` feature for wasm32.

pub mod answer;
pub mod callout;
pub mod cloudevent;
pub mod coalesce;
pub mod config;
pub mod host;
pub mod problem;
pub mod redact;
pub mod response;
pub mod route;
pub mod stream;
pub mod trace;

// The shell exists only in the .wasm; `make lint` checks it for wasm32-wasip1.
#[cfg(all(feature = "proxy", target_arch = "wasm32"))]
mod shell;
