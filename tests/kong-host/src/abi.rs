//! Plumbing between wasmtime and the proxy-wasm ABI: guest memory, the guest allocator, the
//! map and property-path encodings, and typed calls into the filter's exports. Nothing here
//! is Kong-specific; Kong's behaviour lives in `kong_semantics`.

use crate::kong_semantics::VmState;
use wasmtime::{Caller, Extern, Instance, Memory, Store, Val};

/// What the store carries: WASI preview1 (for the filter's `random_get`, `clock_time_get`,
/// `fd_write`) and the Kong side of the VM.
pub struct HostData {
    pub wasi: wasmtime_wasi::p1::WasiP1Ctx,
    pub kong: VmState,
}

pub type Ctx<'a> = Caller<'a, HostData>;

fn memory(c: &mut Ctx<'_>) -> wasmtime::Result<Memory> {
    match c.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::Error::msg("the module exports no memory")),
    }
}

pub fn read(c: &mut Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(c)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&*c);
    data.get(ptr..ptr.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::Error::msg("guest pointer out of bounds"))
}

pub fn read_str(c: &mut Ctx<'_>, ptr: i32, len: i32) -> wasmtime::Result<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut Ctx<'_>, ptr: u32, bytes: &[u8]) -> wasmtime::Result<()> {
    let mem = memory(c)?;
    mem.write(&mut *c, ptr as usize, bytes)
        .map_err(|_| wasmtime::Error::msg("guest pointer out of bounds"))
}

pub fn write_u32(c: &mut Ctx<'_>, ptr: i32, v: u32) -> wasmtime::Result<()> {
    write(c, ptr as u32, &v.to_le_bytes())
}

pub fn write_u64(c: &mut Ctx<'_>, ptr: i32, v: u64) -> wasmtime::Result<()> {
    write(c, ptr as u32, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocated (the SDK frees it with its own allocator)
/// and stores pointer and size at `ret_ptr` / `ret_size`. Empty data is returned as a null
/// pointer, which the SDK reads as "none" / an empty map.
pub fn hand_over(
    c: &mut Ctx<'_>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> wasmtime::Result<()> {
    let ptr = if bytes.is_empty() {
        0
    } else {
        let alloc = c
            .get_export("proxy_on_memory_allocate")
            .or_else(|| c.get_export("malloc"))
            .and_then(Extern::into_func)
            .ok_or_else(|| wasmtime::Error::msg("the module exports no allocator"))?;
        let alloc = alloc.typed::<i32, i32>(&*c)?;
        let p = alloc.call(&mut *c, bytes.len() as i32)? as u32;
        write(c, p, bytes)?;
        p
    };
    write_u32(c, ret_ptr, ptr)?;
    write_u32(c, ret_size, bytes.len() as u32)
}

/// The proxy-wasm map encoding: count, (key len, value len)*, then each key and value
/// followed by a NUL.
pub fn serialize_map(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// `None` for a malformed map (the host's "marshalling error").
pub fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = word(0)?;
    let mut p = 4usize.checked_add(n.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let (kl, vl) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let k = bytes.get(p..p + kl)?;
        p += kl + 1;
        let v = bytes.get(p..p + vl)?;
        p += vl + 1;
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Some(out)
}

/// A property path as the SDK sends it (segments separated by NUL), in dotted form.
pub fn dotted_path(raw: &[u8]) -> String {
    let trimmed = raw.strip_suffix(&[0]).unwrap_or(raw);
    String::from_utf8_lossy(trimmed).replace('\0', ".")
}

/// Calls an export with i32 arguments; `Ok(None)` when the module does not export it (the
/// host then behaves as if it returned its default).
pub fn call(
    store: &mut Store<HostData>,
    instance: &Instance,
    name: &str,
    args: &[i32],
) -> wasmtime::Result<Option<i32>> {
    let Some(func) = instance.get_func(&mut *store, name) else {
        return Ok(None);
    };
    let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
    let ty = func.ty(&*store);
    let mut results = vec![Val::I32(0); ty.results().len()];
    func.call(&mut *store, &params, &mut results)?;
    Ok(Some(results.first().and_then(Val::i32).unwrap_or(0)))
}
