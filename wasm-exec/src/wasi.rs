//! The WASI preview1 side: the guest's context (capabilities, stdio) and the `_start` call.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime::{InstancePre, Store};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::host::HostState;
use crate::limits::Capabilities;
use crate::output::{SharedCapture, Stream};

/// Bytes a guest may write per call; larger writes are split by wasmtime-wasi. 64 KiB matches
/// a pipe buffer, so guests see ordinary write sizes.
const WRITE_PERMIT: usize = 64 << 10;

/// Builds the guest's WASI context: program name only, the granted directories and variables,
/// `stdin` as given (empty if `None`), stdout and stderr captured.
pub(crate) fn context(
    program: &str,
    stdin: Option<Vec<u8>>,
    capabilities: &Capabilities,
    capture: &SharedCapture,
) -> wasmtime::Result<WasiP1Ctx> {
    let mut builder = WasiCtxBuilder::new();
    builder.arg(program);
    if let Some(stdin) = stdin {
        builder.stdin(MemoryInputPipe::new(stdin));
    }
    builder.stdout(CaptureStream::new(capture, Stream::Stdout));
    builder.stderr(CaptureStream::new(capture, Stream::Stderr));
    for var in &capabilities.env {
        builder.env(&var.name, &var.value);
    }
    for dir in &capabilities.dirs {
        let perms = if dir.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        builder
            .preopened_dir(&dir.host, &dir.guest, perms)
            .map_err(|e| {
                e.context(format!(
                    "cannot open granted directory {}",
                    dir.host.display()
                ))
            })?;
    }
    Ok(builder.build_p1())
}

/// Runs a WASI command's `_start`; returns its exit code (0 when `_start` returns).
pub(crate) fn call(
    store: &mut Store<HostState>,
    pre: &InstancePre<HostState>,
) -> wasmtime::Result<i32> {
    let instance = pre.instantiate(&mut *store)?;
    let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
    match start.call(&mut *store, ()) {
        Ok(()) => Ok(0),
        Err(error) => match error.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Ok(exit.0),
            None => Err(error),
        },
    }
}

/// A guest stdout or stderr that appends to the event's capture.
#[derive(Clone)]
struct CaptureStream {
    capture: SharedCapture,
    stream: Stream,
}

impl CaptureStream {
    fn new(capture: &SharedCapture, stream: Stream) -> Self {
        Self {
            capture: capture.clone(),
            stream,
        }
    }
}

impl IsTerminal for CaptureStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CaptureStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CaptureStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.capture.lock().write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CaptureStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CaptureStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.capture.lock().write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
