//! eventwire: a proxy-wasm filter that publishes HTTP requests as CloudEvents through the
//! eventwire sidecar to Kafka.
//!
//! The modules below `filter` are host-free (no proxy-wasm calls), so they are unit-tested
//! natively and in wasm under `wasm-bindgen-test`; `filter` is the thin proxy-wasm shell,
//! compiled only with the default `proxy` feature.

pub mod cloudevent;
pub mod config;
pub mod problem;
pub mod publish;
pub mod route;

// The shell exists only in the .wasm; `make lint` checks it for wasm32-wasip1.
#[cfg(all(feature = "proxy", target_arch = "wasm32"))]
mod filter;
