//! Per-event store state: the WASI context, the memory limiter and the output capture.

use wasmtime::ResourceLimiter;
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::output::SharedCapture;

/// Table elements a guest may grow to: far above what compilers emit for indirect calls,
/// far below what would matter for host memory (8 bytes each).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// What each event's store holds.
pub(crate) struct HostState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) capture: SharedCapture,
}

/// Caps linear memory and remembers whether the cap was hit, so that the trap that usually
/// follows a failed allocation is reported as a memory failure.
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    /// The largest size refused, if any.
    pub(crate) refused: Option<usize>,
}

impl MemoryLimiter {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            refused: None,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = Some(self.refused.map_or(desired, |r| r.max(desired)));
            // `memory.grow` returns -1, as the specification allows; the guest decides.
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
