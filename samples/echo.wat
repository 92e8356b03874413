;; echo: a WASI command that copies its standard input (the event) to its standard output.
;; Rebuild: cargo run -p jobico -- wat2wasm samples/echo.wat -o samples/echo.wasm
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)

  ;; Layout: iovec at 0 (ptr, len), result count at 8, buffer of 4096 bytes at 64.
  (func (export "_start")
    (local $n i32)
    (local $ptr i32)
    (loop $read
      (i32.store (i32.const 0) (i32.const 64))
      (i32.store (i32.const 4) (i32.const 4096))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 1))))
      (local.set $n (i32.load (i32.const 8)))
      (if (i32.eqz (local.get $n)) (then (return)))
      ;; Write the n bytes read, looping over partial writes.
      (local.set $ptr (i32.const 64))
      (loop $write
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $n))
        (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 2))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $n (i32.sub (local.get $n) (i32.load (i32.const 8))))
        (br_if $write (i32.gt_s (local.get $n) (i32.const 0))))
      (br $read)))
)
