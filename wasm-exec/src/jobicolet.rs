//! The jobicolet guest ABI (JobicoK8S): host sequence per event and the `env.log` import.
//!
//! Per event: `ver?()`, `init()`, `p = malloc(len)`, copy the event bytes to `p`,
//! `r = malloc(16)`, `event(r, p, len)`, then read two little-endian u64 at `r`: the error
//! code and `(result_ptr << 32) | result_len`; read the result string; `free` both buffers
//! (`free(ptr, size)` when the module's `free` takes two parameters, as with `ver() == 1`).
//!
//! As in JobicoK8S's host, a failure of the trailing `free` calls does not fail the event: the
//! result is already written (a Rust guest built with `wee_alloc` traps there when `malloc`
//! handed out a dangling pointer for a small size). It is reported as a warning. A failure
//! anywhere before, `malloc`, `init` or `event` included, fails the event.

use std::fmt;

use wasmtime::{Caller, Extern, Instance, InstancePre, Linker, Memory, Store, Val};

use crate::abi::JobicoletShape;
use crate::host::HostState;
use crate::output::{LogLevel, Stream};

/// Size of the return area `event` writes: two u64.
const RETURN_AREA: i32 = 16;

/// The guest broke the jobicolet contract (bad pointer, missing export).
#[derive(Debug)]
pub(crate) struct AbiViolation(pub(crate) String);

impl fmt::Display for AbiViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "jobicolet ABI violation: {}", self.0)
    }
}

impl std::error::Error for AbiViolation {}

fn violation(text: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(AbiViolation(text.into()))
}

/// What `event` returned.
pub(crate) struct Returned {
    pub(crate) code: u64,
    /// The result string, cut at `max_result` bytes.
    pub(crate) result: Vec<u8>,
    /// The length the guest declared.
    pub(crate) declared_len: u32,
    /// Why freeing the buffers failed, if it did (ignored otherwise).
    pub(crate) free_error: Option<wasmtime::Error>,
}

/// Adds `env.log(level, ptr, len)`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "log",
        |mut caller: Caller<'_, HostState>,
         level: i32,
         ptr: i32,
         len: i32|
         -> wasmtime::Result<()> {
            let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
                return Err(violation(
                    "env.log called by a module without memory `memory`",
                ));
            };
            let (data, state) = memory.data_and_store_mut(&mut caller);
            let bytes = slice(data, ptr, len).ok_or_else(|| {
                violation(format!(
                    "env.log({level}, {ptr:#x}, {len}) is out of bounds"
                ))
            })?;
            state
                .capture
                .lock()
                .message(Stream::Log(LogLevel::from_guest(level)), bytes);
            Ok(())
        },
    )?;
    Ok(())
}

fn slice(data: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    data.get(start..end)
}

/// Runs one event through the jobicolet sequence.
pub(crate) fn call(
    store: &mut Store<HostState>,
    pre: &InstancePre<HostState>,
    shape: JobicoletShape,
    event: &[u8],
    max_result: usize,
) -> wasmtime::Result<Returned> {
    let instance = pre.instantiate(&mut *store)?;
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or_else(|| violation("memory `memory` is missing"))?;
    if shape.has_ver {
        instance
            .get_typed_func::<(), i32>(&mut *store, "ver")?
            .call(&mut *store, ())?;
    }
    instance
        .get_typed_func::<(), ()>(&mut *store, "init")?
        .call(&mut *store, ())?;
    let malloc = instance.get_typed_func::<i32, i32>(&mut *store, "malloc")?;
    let len = i32::try_from(event.len()).map_err(|_| violation("event larger than 2 GiB"))?;
    let ptr = malloc.call(&mut *store, len)?;
    memory
        .write(&mut *store, ptr as u32 as usize, event)
        .map_err(|_| violation(format!("malloc({len}) returned {ptr:#x}, out of bounds")))?;
    let ret = malloc.call(&mut *store, RETURN_AREA)?;
    instance
        .get_typed_func::<(i32, i32, i32), ()>(&mut *store, "event")?
        .call(&mut *store, (ret, ptr, len))?;
    let mut area = [0u8; RETURN_AREA as usize];
    memory
        .read(&*store, ret as u32 as usize, &mut area)
        .map_err(|_| violation(format!("malloc(16) returned {ret:#x}, out of bounds")))?;
    let code = u64::from_le_bytes(area[..8].try_into().expect("8 bytes"));
    let packed = u64::from_le_bytes(area[8..].try_into().expect("8 bytes"));
    let result_ptr = (packed >> 32) as u32;
    let declared_len = packed as u32;
    let result = read_result(&memory, store, result_ptr, declared_len, max_result)?;
    // The guest's allocator is not trusted after a failed `free`: stop at the first one.
    let free_error = free(&instance, store, shape, ptr, len)
        .and_then(|()| free(&instance, store, shape, ret, RETURN_AREA))
        .err();
    Ok(Returned {
        code,
        result,
        declared_len,
        free_error,
    })
}

fn read_result(
    memory: &Memory,
    store: &Store<HostState>,
    ptr: u32,
    len: u32,
    max: usize,
) -> wasmtime::Result<Vec<u8>> {
    let data = memory.data(store);
    let start = ptr as usize;
    let end = start + len as usize;
    if end > data.len() {
        return Err(violation(format!(
            "result {ptr:#x}+{len} is outside memory of {} bytes",
            data.len()
        )));
    }
    Ok(data[start..end.min(start + max)].to_vec())
}

fn free(
    instance: &Instance,
    store: &mut Store<HostState>,
    shape: JobicoletShape,
    ptr: i32,
    size: i32,
) -> wasmtime::Result<()> {
    let free = instance
        .get_func(&mut *store, "free")
        .ok_or_else(|| violation("function `free` is missing"))?;
    let args = [Val::I32(ptr), Val::I32(size)];
    let args = if shape.free_takes_size {
        &args[..]
    } else {
        &args[..1]
    };
    free.call(&mut *store, args, &mut [])
}
