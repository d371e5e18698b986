//! Shared by the fuzz targets: the sidecar's CloudEvents code and a structured input type.
//!
//! The sidecar is a binary crate (no `[lib]`), so its modules cannot be imported. Its
//! `cloudevent` module is pure (no I/O, no `crate::` paths), so it is compiled here straight
//! from its source: the inline module below makes `sidecar/src` the directory in which
//! `cloudevent.rs` and then `cloudevent/{kafka,percent,validate}.rs` are found. Should that
//! module ever reach into other sidecar modules, this stops compiling; the lasting fix is a
//! `[lib]` target in sidecar/Cargo.toml that main.rs uses.

#[path = "../../sidecar/src"]
#[allow(dead_code, clippy::all)]
pub mod sidecar {
    pub mod cloudevent;
}
