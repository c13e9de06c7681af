;; Test fixture: a weir:plugin@0.1.0 transformer (it drops every record) that
;; also instantiates 40 core modules, each with its own 24 MiB linear memory
;; whose every page it touches. Each memory is under a 32 MiB cap; together
;; they are 960 MiB. The host must hold the whole instance to one cap.
;;
;; Written by hand because no Rust toolchain emits several memories; the
;; tests turn it into a binary component with the `wat` crate.
(component
  (core module $plugin
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    ;; plugin-info: name "hostile" at 16, version "0.1.0" at 32, record at 64.
    (data (i32.const 16) "hostile")
    (data (i32.const 32) "0.1.0")
    (data (i32.const 64) "\10\00\00\00\07\00\00\00\20\00\00\00\05\00\00\00")
    ;; A bump allocator that grows memory as needed.
    (func $realloc (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $ptr i32)
      (local.set $ptr
        (i32.and
          (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
          (i32.xor (i32.sub (local.get 2) (i32.const 1)) (i32.const -1))))
      (global.set $heap (i32.add (local.get $ptr) (local.get 3)))
      (block $enough
        (loop $grow
          (br_if $enough
            (i32.le_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))))
          (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
          (br $grow)))
      (local.get $ptr))
    (func (export "describe") (result i32) (i32.const 64))
    ;; result<_, string>: a zeroed area means `ok`.
    (func (export "init") (param i32 i32) (result i32) (i32.const 128))
    ;; One "emit nothing" outcome (9 zero bytes) per record.
    (func (export "process") (param $batch i32) (param $len i32) (result i32)
      (local $count i32) (local $reply i32) (local $size i32)
      (local.set $count (i32.load (local.get $batch)))
      (local.set $size (i32.add (i32.const 4) (i32.mul (local.get $count) (i32.const 9))))
      (local.set $reply (call $realloc (i32.const 0) (i32.const 0) (i32.const 4) (local.get $size)))
      (i32.store (local.get $reply) (local.get $count))
      (i32.store (i32.const 256) (local.get $reply))
      (i32.store (i32.const 260) (local.get $size))
      (i32.const 256))
  )
  ;; 24 MiB (384 pages), every page touched when instantiated.
  (core module $hog
    (memory 384)
    (func $touch
      (local $page i32)
      (loop $next
        (i32.store8 (i32.shl (local.get $page) (i32.const 16)) (i32.const 1))
        (local.set $page (i32.add (local.get $page) (i32.const 1)))
        (br_if $next (i32.lt_u (local.get $page) (i32.const 384)))))
    (start $touch))
  (core instance $p (instantiate $plugin))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (core instance (instantiate $hog)) (core instance (instantiate $hog))
  (type $info (record (field "name" string) (field "version" string)))
  (type $bytes (list u8))
  (func $describe (result $info)
    (canon lift (core func $p "describe") (memory (core memory $p "memory")) (realloc (core func $p "cabi_realloc"))))
  (func $init (param "config" string) (result (result (error string)))
    (canon lift (core func $p "init") (memory (core memory $p "memory")) (realloc (core func $p "cabi_realloc"))))
  (func $process (param "batch" $bytes) (result $bytes)
    (canon lift (core func $p "process") (memory (core memory $p "memory")) (realloc (core func $p "cabi_realloc"))))
  (instance $transform
    (export "plugin-info" (type $info))
    (export "describe" (func $describe))
    (export "init" (func $init))
    (export "process" (func $process)))
  (export "weir:plugin/transform@0.1.0" (instance $transform))
)
