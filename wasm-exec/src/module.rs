//! A loaded module and the per-event run: fresh store and instance, limits, outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobico_common::ExecEvent;
use wasmtime::{InstancePre, Store, Trap};

use crate::abi::{Abi, Detected};
use crate::engine::Engine;
use crate::error::boxed;
use crate::host::{HostState, MemoryLimiter};
use crate::jobicolet::{self, AbiViolation};
use crate::limits::{Capabilities, Limits};
use crate::output::{OutputSink, SharedCapture, Stream};
use crate::summary::{ErrorKind, EventOutcome, Status};
use crate::{Error, wasi};

/// A compiled module, ready to run events. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Module {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    name: String,
    module: wasmtime::Module,
    pre: InstancePre<HostState>,
    detected: Detected,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.inner.name)
            .field("abi", &self.inner.detected.abi)
            .finish_non_exhaustive()
    }
}

/// How an event ended, before it becomes an [`EventOutcome`].
struct Ending {
    status: Status,
    exit_code: Option<i64>,
    error: Option<ErrorKind>,
    message: Option<String>,
    warning: Option<String>,
    result: Option<String>,
}

impl Ending {
    fn failed(error: ErrorKind, message: String) -> Self {
        Self {
            status: Status::Failed,
            exit_code: None,
            error: Some(error),
            message: Some(message),
            warning: None,
            result: None,
        }
    }

    fn exited(code: i32) -> Self {
        if code == 0 {
            Self {
                status: Status::Succeeded,
                exit_code: Some(0),
                error: None,
                message: None,
                warning: None,
                result: None,
            }
        } else {
            Self {
                exit_code: Some(code.into()),
                ..Self::failed(ErrorKind::Exit, format!("guest exited with code {code}"))
            }
        }
    }
}

impl Module {
    pub(crate) fn new(
        engine: Arc<Engine>,
        name: String,
        module: wasmtime::Module,
        pre: InstancePre<HostState>,
        detected: Detected,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                name,
                module,
                pre,
                detected,
            }),
        }
    }

    /// The guest ABI detected from the module's exports.
    pub fn abi(&self) -> Abi {
        self.inner.detected.abi
    }

    /// The module's name (its file name, or the name given to `load_bytes`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The module compiled for this engine, as `.cwasm` bytes.
    pub fn serialize(&self) -> Result<Vec<u8>, Error> {
        self.inner.module.serialize().map_err(|e| Error::Serialize {
            name: self.inner.name.clone(),
            source: boxed(e),
        })
    }

    /// Runs one event in a fresh store and instance under `limits`, with `capabilities`.
    /// Blocks (call it from a blocking thread, not an async task). Guest output goes to
    /// `sink` when the event ends; the outcome is also passed to [`OutputSink::finish`].
    /// Never fails: every failure is described in the outcome.
    pub fn run(
        &self,
        event: &ExecEvent,
        limits: &Limits,
        capabilities: &Capabilities,
        sink: &mut dyn OutputSink,
    ) -> EventOutcome {
        let _span =
            tracing::debug_span!("event", id = %event.id, module = %self.inner.name).entered();
        let _slot = self.inner.engine.acquire_slot();
        let started = Instant::now();
        let capture = SharedCapture::new(limits.output_cap_bytes, sink.framing(&event.id));
        if capabilities.stdout_result && self.abi() == Abi::Wasi {
            capture.lock().keep_stdout_result();
        }
        let (ending, memory_refused) = self.execute(event, limits, capabilities, &capture);
        let captured = capture.lock().finish();
        for (stream, line) in captured.lines() {
            sink.line(&event.id, stream, line);
        }
        let mut ending = ending;
        if let Some(refused) = memory_refused
            && ending.status == Status::Failed
            && ending.error != Some(ErrorKind::Host)
        {
            ending.error = Some(ErrorKind::Memory);
            ending.message = Some(format!(
                "memory limit of {} bytes reached (guest wanted {refused} bytes): {}",
                limits.memory_bytes,
                ending.message.unwrap_or_default()
            ));
        }
        let outcome = EventOutcome {
            id: event.id.clone(),
            status: ending.status,
            exit_code: ending.exit_code,
            error: ending.error,
            message: ending.message,
            warning: ending.warning,
            duration: started.elapsed(),
            output_bytes: captured.produced,
            output_truncated: captured.truncated,
            result: ending.result.or(captured.stdout_result),
        };
        if let Some(warning) = &outcome.warning {
            tracing::warn!(id = %outcome.id, warning, "event kept despite a guest error");
        }
        if outcome.succeeded() {
            tracing::debug!(duration = ?outcome.duration, "event succeeded");
        } else {
            tracing::warn!(
                id = %outcome.id,
                error = outcome.error.map_or("", ErrorKind::as_str),
                exit_code = outcome.exit_code,
                message = outcome.message.as_deref().unwrap_or(""),
                "event failed"
            );
        }
        sink.finish(&outcome);
        outcome
    }

    /// Runs the guest; returns how it ended and the memory size refused, if any.
    fn execute(
        &self,
        event: &ExecEvent,
        limits: &Limits,
        capabilities: &Capabilities,
        capture: &SharedCapture,
    ) -> (Ending, Option<usize>) {
        let data = serde_json::to_vec(&event.data).expect("JSON values serialise");
        let abi = self.abi();
        let stdin = (abi == Abi::Wasi).then(|| data.clone());
        let wasi = match wasi::context(&self.inner.name, stdin, capabilities, capture) {
            Ok(wasi) => wasi,
            Err(error) => return (Ending::failed(ErrorKind::Host, describe(&error)), None),
        };
        let limiter = MemoryLimiter::new(limits.memory_bytes);
        let mut store = Store::new(
            self.inner.engine.wasm(),
            HostState {
                wasi,
                limiter,
                capture: capture.clone(),
            },
        );
        store.limiter(|state| &mut state.limiter);
        // Fuel metering is always compiled in; no limit means as much as can be counted.
        if let Err(error) = store.set_fuel(limits.fuel.unwrap_or(u64::MAX)) {
            return (Ending::failed(ErrorKind::Host, describe(&error)), None);
        }
        store.set_epoch_deadline(deadline_ticks(
            limits.deadline,
            self.inner.engine.epoch_tick(),
        ));
        store.epoch_deadline_trap();

        let ending = match abi {
            Abi::Wasi => match wasi::call(&mut store, &self.inner.pre) {
                Ok(code) => Ending::exited(code),
                Err(error) => classify(&error),
            },
            Abi::Jobicolet => {
                let shape = self
                    .inner
                    .detected
                    .shape
                    .expect("jobicolet shape detected at load");
                let max_result = usize::try_from(limits.output_cap_bytes).unwrap_or(usize::MAX);
                match jobicolet::call(&mut store, &self.inner.pre, shape, &data, max_result) {
                    Ok(returned) => {
                        capture.lock().message(Stream::Result, &returned.result);
                        let mut result = String::from_utf8_lossy(&returned.result).into_owned();
                        if (returned.declared_len as usize) > returned.result.len() {
                            result.push('…');
                        }
                        let failed = returned.code != 0;
                        let warning = returned.free_error.map(|error| {
                            format!(
                                "the guest's `free` failed after the result was written \
                                 (ignored, as JobicoK8S does): {}",
                                describe(&error)
                            )
                        });
                        Ending {
                            status: if failed {
                                Status::Failed
                            } else {
                                Status::Succeeded
                            },
                            exit_code: Some(returned.code as i64),
                            error: failed.then_some(ErrorKind::GuestError),
                            message: failed
                                .then(|| format!("guest returned error code {}", returned.code)),
                            warning,
                            result: Some(result),
                        }
                    }
                    Err(error) => match error.downcast_ref::<wasmtime_wasi::I32Exit>() {
                        Some(exit) => Ending {
                            exit_code: Some(exit.0.into()),
                            ..Ending::failed(
                                ErrorKind::Exit,
                                format!("jobicolet guest called proc_exit({})", exit.0),
                            )
                        },
                        None => classify(&error),
                    },
                }
            }
        };
        let refused = store.data().limiter.refused;
        (ending, refused)
    }
}

/// Epoch ticks for `deadline`, rounded up, plus one because the current tick is already
/// partly over: the deadline fires between `deadline` and `deadline + tick`.
fn deadline_ticks(deadline: Duration, tick: Duration) -> u64 {
    let tick = tick.as_nanos().max(1);
    let ticks = deadline.as_nanos().div_ceil(tick);
    u64::try_from(ticks).unwrap_or(u64::MAX - 1) + 1
}

/// Maps a wasmtime error from instantiation or a guest call to a failure.
fn classify(error: &wasmtime::Error) -> Ending {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        let kind = match trap {
            Trap::Interrupt => ErrorKind::Deadline,
            Trap::OutOfFuel => ErrorKind::Fuel,
            _ => ErrorKind::Trap,
        };
        let message = match trap {
            Trap::Interrupt => "deadline exceeded".to_owned(),
            other => other.to_string(),
        };
        return Ending::failed(kind, message);
    }
    if error.downcast_ref::<AbiViolation>().is_some() {
        return Ending::failed(ErrorKind::Abi, describe(error));
    }
    tracing::debug!(error = ?error, "guest failed");
    Ending::failed(ErrorKind::Trap, describe(error))
}

/// The error chain without wasm backtraces, joined with ": ".
fn describe(error: &wasmtime::Error) -> String {
    let parts: Vec<String> = error
        .chain()
        .map(ToString::to_string)
        .filter(|text| !text.starts_with("error while executing at wasm backtrace"))
        .collect();
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_ticks_round_up() {
        let tick = Duration::from_millis(10);
        assert_eq!(deadline_ticks(Duration::from_millis(200), tick), 21);
        assert_eq!(deadline_ticks(Duration::from_millis(201), tick), 22);
        assert_eq!(deadline_ticks(Duration::ZERO, tick), 1);
    }
}
