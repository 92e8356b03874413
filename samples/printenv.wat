;; printenv: a WASI command that prints the environment variables it was granted, one
;; NAME=value per line, as WASI's environ_get hands them over (the sample of
;; samples/ev3.yaml; a real module would use its secrets, not print them).
;; Rebuild: scripts/build-samples.sh
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "\n")

  ;; Writes len bytes at ptr to stdout (iovec at 0, count at 8).
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  ;; Layout: the variable count at 16, their bytes at 20; memory grown past the first page
  ;; for the pointers (from 65536) and the strings after them.
  (func (export "_start")
    (local $count i32) (local $strings i32) (local $i i32) (local $ptr i32) (local $end i32)
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $count (i32.load (i32.const 16)))
    (local.set $strings (i32.add (i32.const 65536) (i32.shl (local.get $count) (i32.const 2))))
    (drop (memory.grow
      (i32.add
        (i32.shr_u
          (i32.add (i32.load (i32.const 20)) (i32.shl (local.get $count) (i32.const 2)))
          (i32.const 16))
        (i32.const 1))))
    (drop (call $environ_get (i32.const 65536) (local.get $strings)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $ptr
          (i32.load (i32.add (i32.const 65536) (i32.shl (local.get $i) (i32.const 2)))))
        (local.set $end (local.get $ptr))
        (block $found
          (loop $scan
            (br_if $found (i32.eqz (i32.load8_u (local.get $end))))
            (local.set $end (i32.add (local.get $end) (i32.const 1)))
            (br $scan)))
        (call $write (local.get $ptr) (i32.sub (local.get $end) (local.get $ptr)))
        (call $write (i32.const 32) (i32.const 1))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))
)
