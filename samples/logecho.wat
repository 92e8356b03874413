;; logecho: a jobicolet module (the JobicoK8S guest ABI). For each event it logs a line at
;; level info through env.log and returns the event itself as its result.
;; Rebuild: cargo run -p jobico -- wat2wasm samples/logecho.wat -o samples/logecho.wasm
(module
  (import "env" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "logecho: received an event")

  ;; A bump allocator: each run gets a fresh instance, so nothing is ever reused.
  (global $heap (mut i32) (i32.const 1024))

  (func $malloc (export "malloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local $end i32)
    (local.set $ptr (global.get $heap))
    ;; Keep allocations 8-byte aligned.
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $len)) (i32.const 7)) (i32.const -8)))
    ;; Grow memory when the allocation does not fit; 0 means out of memory.
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow
                (i32.add
                  (i32.div_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
                    (i32.const 65536))
                  (i32.const 1)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))

  (func (export "free") (param i32))

  (func (export "init"))

  ;; event(retptr, ptr, len): log, then answer error code 0 and the event bytes as the result.
  (func (export "event") (param $ret i32) (param $ptr i32) (param $len i32)
    ;; Level 1 is info.
    (call $log (i32.const 1) (i32.const 16) (i32.const 26))
    (i64.store (local.get $ret) (i64.const 0))
    (i64.store offset=8 (local.get $ret)
      (i64.or
        (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
        (i64.extend_i32_u (local.get $len)))))
)
