;; order: a WASI command for the chaining sample (samples/chain.yaml). It reads the event (an
;; order such as {"item":"book","qty":2}) from standard input and prints
;; {"order":<the event>} on standard output: its result, which `then` routes hand on. An order
;; of quantity 0 ({"qty":0}) is refused: a line on standard error and exit code 3.
;; Rebuild: cargo run -p jobico -- wat2wasm samples/order.wat -o samples/order.wasm
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)

  ;; Layout: iovec at 0 (ptr, len), count at 8, texts from 16, the event from 1024.
  (data (i32.const 16) "{\"order\":")
  (data (i32.const 32) "}\n")
  (data (i32.const 48) "\"qty\":0")
  (data (i32.const 64) "order: the quantity must be at least 1\n")

  ;; Writes len bytes at ptr to fd, looping over partial writes.
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (loop $more
      (i32.store (i32.const 0) (local.get $ptr))
      (i32.store (i32.const 4) (local.get $len))
      (if (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 2))))
      (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
      (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
      (br_if $more (i32.gt_s (local.get $len) (i32.const 0)))))

  ;; Whether the 7 bytes of "qty":0 start at ptr and a ',' or '}' follows them.
  (func $zero_qty (param $ptr i32) (result i32)
    (local $i i32)
    (local $next i32)
    (block $no
      (loop $compare
        (br_if $no (i32.ne (i32.load8_u (i32.add (local.get $ptr) (local.get $i)))
                           (i32.load8_u (i32.add (i32.const 48) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $compare (i32.lt_u (local.get $i) (i32.const 7))))
      (local.set $next (i32.load8_u (i32.add (local.get $ptr) (i32.const 7))))
      (return (i32.or (i32.eq (local.get $next) (i32.const 0x2c))
                      (i32.eq (local.get $next) (i32.const 0x7d)))))
    (i32.const 0))

  (func (export "_start")
    (local $len i32)
    (local $n i32)
    (local $i i32)
    ;; Read the whole event (up to 127 KiB) into 1024...
    (loop $read
      (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $len)))
      (i32.store (i32.const 4) (i32.sub (i32.const 130048) (local.get $len)))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 2))))
      (local.set $n (i32.load (i32.const 8)))
      (local.set $len (i32.add (local.get $len) (local.get $n)))
      (br_if $read (i32.and (i32.ne (local.get $n) (i32.const 0))
                            (i32.lt_u (local.get $len) (i32.const 130048)))))
    ;; ... refuse a quantity of 0 ...
    (block $checked
      (loop $scan
        (br_if $checked (i32.gt_u (i32.add (local.get $i) (i32.const 8)) (local.get $len)))
        (if (call $zero_qty (i32.add (i32.const 1024) (local.get $i)))
          (then
            (call $write (i32.const 2) (i32.const 64) (i32.const 39))
            (call $proc_exit (i32.const 3))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    ;; ... and print it wrapped.
    (call $write (i32.const 1) (i32.const 16) (i32.const 9))
    (call $write (i32.const 1) (i32.const 1024) (local.get $len))
    (call $write (i32.const 1) (i32.const 32) (i32.const 2)))
)
