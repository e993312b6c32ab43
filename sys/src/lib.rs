//! Raw FFI bindings to Xen's libxenlight (**libxl**) and xentoollog, generated
//! by bindgen at build time, plus a small C shim (`shim/shim.c`).
//!
//! This crate is deliberately thin: every item is the C API, 1:1. The safe
//! layer (contexts, events, logging to `tracing`) lives in `domkit-libxl`.
//! This page is the one place that records the rules the safe layer must
//! enforce; quotes are from the Xen 4.17 headers in `/usr/include`
//! (`file:line`).
//!
//! # Contents
//!
//! * Everything matching `libxl_*` / `LIBXL_*` from `libxl.h`,
//!   `libxl_event.h`, `libxl_utils.h`, `libxl_uuid.h` (and the IDL-generated
//!   `_libxl_types.h` they include), `xentoollog_*` / `xtl_*` / `XTL_*` from
//!   `xentoollog.h`, and the libxl error codes (`ERROR_*`).
//!   C enums become integer type aliases plus one constant per value, named
//!   as in C: [`LIBXL_SHUTDOWN_REASON_SUSPEND`], [`LIBXL_EVENT_TYPE_DOMAIN_DEATH`],
//!   [`ERROR_NOT_READY`], [`libxl_sigchld_owner_mainloop`], ... (no Rust enums:
//!   libxl may hand back values a newer Xen added). The C field `type` is
//!   spelled `type_`.
//! * The C shim, `libxenlight_sys_*`:
//!   - logger: [`libxenlight_sys_logger_new`], [`libxenlight_sys_logger_set_min_level`],
//!     [`libxenlight_sys_logger_destroy`], [`libxenlight_sys_log`] (see
//!     [Logging](#logging));
//!   - the `static inline` helpers of `libxl_utils.h` bindgen cannot call:
//!     [`libxenlight_sys_bitmap_set_any`], [`libxenlight_sys_bitmap_set_none`],
//!     [`libxenlight_sys_bitmap_equal`];
//!   - self-checks: [`libxenlight_sys_macros`] and [`libxenlight_sys_layouts`]
//!     (what the C compiler thinks; the tests compare them with this crate).
//! * Macros bindgen gets wrong (`~0`, `~0ULL`, casts), defined by hand below
//!   with their C types: [`INVALID_DOMID`], [`RANDOM_DOMID`],
//!   [`LIBXL_EVENTMASK_ALL`], [`LIBXL_MEMKB_DEFAULT`], [`LIBXL_PCI_FUNC_ALL`], ...
//! * Build facts: [`LIBXL_API_VERSION`], [`LIBXL_HAVE`] (every
//!   `LIBXL_HAVE_*` defined, including the valueless ones bindgen skips such as
//!   `LIBXL_HAVE_CREATEINFO_DOMID`), [`XENLIGHT_VERSION`], [`BINDGEN_VERSION`],
//!   [`CLANG_VERSION`], [`BINDGEN_FLAGS`].
//!   Dependents' build scripts also get `DEP_XENLIGHT_API_VERSION`,
//!   `DEP_XENLIGHT_HAVE` (comma-separated), `DEP_XENLIGHT_INCLUDE` and
//!   `DEP_XENLIGHT_SHIM_INCLUDE` (`links = "xenlight"`).
//!
//! Functions the driver needs, all bound: `libxl_ctx_alloc`/`_free`,
//! `libxl_domain_create_new`, `libxl_domain_create_restore` (+
//! `libxl_domain_restore_params_init`/`_dispose`), `libxl_domain_suspend`
//! (to an fd; `LIBXL_SUSPEND_LIVE`), `libxl_domain_suspend_only`,
//! `libxl_domain_resume`, `libxl_domain_pause`/`_unpause`,
//! `libxl_domain_shutdown`, `libxl_domain_reboot`, `libxl_domain_destroy`,
//! `libxl_domain_soft_reset`, `libxl_send_trigger`, `libxl_domain_rename`,
//! `libxl_domain_info`, `libxl_list_domain`, `libxl_name_to_domid`,
//! `libxl_domid_to_name`, `libxl_retrieve_domain_configuration`,
//! `libxl_domain_config_{init,dispose,from_json,to_json}`,
//! `libxl_domain_build_info_init_type`,
//! `libxl_device_{disk,nic}_{init,dispose,from_json,add,remove}` (device hotplug: the
//! caller owns the struct, init before and dispose after the call; libxl copies what it
//! keeps), `libxl_event_{check,wait,free,register_callbacks}`,
//! `libxl_evenable_domain_death`/`libxl_evdisable_domain_death`,
//! `libxl_osevent_{register_hooks,beforepoll,afterpoll,occurred_fd,occurred_timeout}`,
//! `libxl_childproc_{setmode,reaped,sigchld_occurred}`, `libxl_ao_abort`,
//! `libxl_uuid_*`, `libxl_defbool_*`, and the structs `libxl_asyncop_how`,
//! `libxl_asyncprogress_how`, `libxl_event_hooks`, `libxl_osevent_hooks`,
//! `libxl_childproc_hooks`.
//!
//! # Choice of `LIBXL_API_VERSION`
//!
//! The bindings and the shim are built with `LIBXL_API_VERSION = 0x041400`
//! (set once, in `build.rs`, and passed to both bindgen and the C compiler;
//! `shim.h` refuses to compile without it). libxl.h:26-40 asks applications to
//! pin it: "Lack of LIBXL_API_VERSION means "the latest" which will change"
//! (libxl.h:38-39).
//! The Xen 4.17 headers accept 0x040200 ... 0x040800, 0x041300 and 0x041400
//! (libxl.h:768-775); the API of 4.14 to 4.17 is the same, so 0x041400 is
//! "current", and later Xen releases keep accepting it.
//!
//! What the two candidates give:
//!
//! * **0x041300 and 0x041400 are identical for every function we use.** All
//!   the compatibility wrappers are under `LIBXL_API_VERSION < 0x041300`, so
//!   with either value we get the real, newest signatures:
//!   `libxl_domain_create_new(ctx, d_config, domid, ao_how, aop_console_how)`,
//!   `libxl_domain_create_restore(ctx, d_config, domid, restore_fd,
//!   send_back_fd, params, ao_how, aop_console_how)` (libxl.h:1674-1685),
//!   `libxl_domain_suspend(ctx, domid, fd, flags, ao_how)` (libxl.h:1764),
//!   and an `ao_how` parameter on `libxl_domain_shutdown`, `_reboot`,
//!   `_pause`, `_unpause`, `libxl_send_trigger`,
//!   `libxl_retrieve_domain_configuration`, `libxl_qemu_monitor_command`
//!   (`LIBXL_HAVE_FN_USING_QMP_ASYNC`, libxl.h:1365-1379; the `_0x041200`
//!   static-inline wrappers without it exist only below 0x041300,
//!   libxl.h:1803-1816, 1850-1863).
//! * **The only difference**: below 0x041400, libxl.h:2479-2503 adds no-op
//!   `static inline` stubs `libxl_cpuid_apply_policy` / `libxl_cpuid_set`
//!   ("Dropped from the API in Xen 4.14"). bindgen cannot bind static
//!   inlines and they do nothing anyway.
//!
//! So 0x041400 is chosen: the newest stable API number these headers accept,
//! with every long-running operation asynchronous-capable (`ao_how`), which the
//! async driver needs (pass `NULL` for a synchronous call). Surprise: that
//! `#if LIBXL_API_VERSION < 0x041400` has no `defined()` guard, so a program
//! that does not define the version at all also gets the 4.13 stubs.
//!
//! # Ownership
//!
//! libxl.h:565-570: "struct libxl_ctx* is threadsafe, and all returned
//! allocated structures are obtained from malloc(), and must be freed by the
//! caller either directly or by calling an appropriate free function provided
//! by libxl."
//!
//! * **IDL types** (`libxl_domain_config`, `libxl_domain_build_info`,
//!   `libxl_dominfo`, `libxl_domain_restore_params`, `libxl_device_*`,
//!   `libxl_bitmap`, `libxl_event`, ...: every type with a
//!   `libxl_<type>_dispose`). libxl.h:684-691: "the user must always call the
//!   "init" function before using a type, even if the variable is simply being
//!   passed by reference as an out parameter to a libxl function. The user must
//!   always calls "dispose" exactly once afterwards [...] regardless of whether
//!   operations on this object succeeded or failed." and ""init" and "dispose"
//!   are idempotent." `dispose` frees the members, not the struct itself
//!   (libxl.h:724-728). Keyed unions need `libxl_<type>_init_<field>` after
//!   `init`, e.g. `libxl_domain_build_info_init_type(&b_info, LIBXL_DOMAIN_TYPE_PVH)`;
//!   "p->subfield must not have been previously initialised" (libxl.h:720).
//!   In Rust: `MaybeUninit` + `libxl_X_init`, never `mem::zeroed()` alone
//!   (libxl's defaults are not all zero). These types do **not** implement
//!   `Copy`/`Clone` here (a bitwise copy disposed twice is a double free);
//!   unions holding them use `ManuallyDrop` fields.
//! * **Strings inside IDL types** are owned by the struct and `free()`d by
//!   `dispose`: anything stored there must come from `malloc` (`libc::strdup`),
//!   never from a Rust `CString`.
//! * **Returned strings** (`libxl_domid_to_name`, `libxl_domain_config_to_json`,
//!   `libxl_*_to_json`, `libxl_console_get_tty`, `libxl_basename` "returns
//!   string from strdup", libxl_utils.h:24) are `malloc`ed: free them with
//!   `libc::free`. Strings from `libxl_*_to_string` are static: never free.
//! * **Lists**: libxl.h:1987-1991: "These arrays and their contents come from
//!   malloc, and must be freed with the corresponding libxl_THING_list_free
//!   function." `libxl_list_domain` → `libxl_dominfo_list_free(list, n)`;
//!   `libxl_list_vcpu(ctx, domid, &nb, &nrcpus)` → `libxl_vcpuinfo_list_free(list, nb)`;
//!   `libxl_list_vm` → `libxl_vminfo_list_free`, etc.
//! * **Events**: from `libxl_event_check`/`_wait`, "must then later be freed
//!   by the caller using libxl_event_free" (libxl_event.h:44-45); given to the
//!   `event_occurs` hook, the "event becomes owned by the application and must
//!   be freed, either by event_occurs or later" (libxl_event.h:84-85); given to
//!   a `libxl_asyncprogress_how` callback, "the callback, if provided, is
//!   responsible for freeing the event" (libxl.h:1583-1584).
//! * **Event generators** (`libxl_evgen_domain_death`): "After libxl_ctx_free,
//!   all corresponding evgen handles become invalid and must no longer be
//!   passed to evdisable" (libxl_event.h:166-168): disable them before freeing
//!   the ctx. Events not retrieved "will be queued inside libxl indefinitely"
//!   (libxl_event.h:170-173).
//! * **`ao_how`**: "*ao_how does not need to remain valid after the initiating
//!   function returns. All other parameters must remain valid for the lifetime
//!   of the asynchronous operation" (libxl.h:1542-1544): e.g. the
//!   `libxl_domain_config` and `domid` out-pointer given to an async
//!   `libxl_domain_create_new` must live until its completion callback.
//! * **Plain structs** (`libxl_uuid`, `libxl_defbool`, `libxl_mac`,
//!   `libxl_asyncop_how`, `libxl_*_hooks`) need no init/dispose. The `*_hooks`
//!   passed to `libxl_osevent_register_hooks` and `libxl_childproc_setmode` are
//!   **not copied** and "must outlast the libxl_ctx" (libxl_event.h:377, 552).
//! * **Logger**: `libxl_ctx_alloc` borrows the `xentoollog_logger`; destroy
//!   the logger only after `libxl_ctx_free` (NULL ctx is OK, libxl.h:1663).
//! * **Out of memory**: "If malloc (or realloc) fails, libxl will cause the
//!   entire process to print a message to stderr and exit with status 255"
//!   (libxl.h:673-675).
//!
//! # Threads, callbacks, signals
//!
//! * **The ctx is thread-safe** (libxl.h:566, above): one `libxl_ctx` per
//!   process, shared by all threads (the safe wrapper holds the pointer in an
//!   `Arc` and may `unsafe impl Send + Sync`), freed once, after every
//!   operation completed and every evgen was disabled. Concurrent calls on the
//!   same ctx are allowed and serialised by libxl's internal lock where needed.
//!   Several ctxs are possible but complicate SIGCHLD (below).
//! * **Setup calls are not concurrent-safe**: `libxl_event_register_callbacks`:
//!   "it is NOT safe to call _register_callbacks concurrently with, or
//!   reentrantly from, any other libxl function, nor while any
//!   event-generation facilities are enabled" (libxl_event.h:123-128);
//!   "osevent_register_hooks may be called only once for each libxl_ctx"
//!   (libxl_event.h:355); `libxl_childproc_setmode` "May not be called when
//!   libxl might have any child processes [...] So it is best to call this at
//!   initialisation" (libxl_event.h:546-550). Do all three right after
//!   `libxl_ctx_alloc`, before the ctx is shared.
//! * **Callbacks run on the caller's threads**: ao completion and progress
//!   callbacks: "Callbacks may occur on any thread in which the application
//!   calls libxl" (libxl.h:1546-1547). Event hooks: "it IS permitted to call
//!   libxl from within event_occurs. It is NOT permitted to call libxl from
//!   within disaster. The event_occurs and disaster callbacks may occur on any
//!   thread in which the application calls libxl" (libxl_event.h:118-121).
//!   An async operation may even complete, and call its callback, before the
//!   initiating function returns (libxl.h:1530-1535). Without a `disaster`
//!   hook, libxl calls `exit(-1)` on unrecoverable event errors
//!   (libxl_event.h:101-104). The fd/timeout `register`/`modify` hooks "may be
//!   called with locks held" and the application "MUST NOT make the event
//!   occurrence calls (libxl_osevent_occurred_*) into libxl reentrantly from
//!   within libxl" (libxl_event.h:356-375; recommended lock order (a): never
//!   call libxl while holding a lock the hooks take). With
//!   `beforepoll`/`afterpoll` "it is therefore not possible to have multiple
//!   threads simultaneously polling using this interface" (libxl_event.h:266-269).
//!   Rust callbacks must be `extern "C"` and must not unwind.
//! * **SIGCHLD**: libxl forks (hotplug scripts, device model, bootloader,
//!   save/restore helper) whenever an `ao_how` operation runs, "even if NULL is
//!   passed", or events are enabled (libxl_event.h:421-429). By default
//!   (`libxl_sigchld_owner_libxl`) libxl installs its own SIGCHLD handler and
//!   "reaps all children" (libxl_event.h:487-488), and the application "Must not
//!   install a SIGCHLD handler" nor "reap any children" (libxl_event.h:451-456);
//!   a multithreaded program needs "at least one thread that has SIGCHLD
//!   unblocked" (libxl_event.h:431-435). **Surprise**: when libxl installs its
//!   handler it *asserts* that the previous one was `SIG_DFL`/`SIG_IGN` without
//!   `SA_SIGINFO` ("application must negotiate with libxl about SIGCHLD",
//!   `libxl_fork.c`); tokio's signal handling (used by `tokio::process`,
//!   i.e. the QEMU driver in the same process) installs exactly such a handler,
//!   so the default mode would abort the process. A tokio application should
//!   therefore call `libxl_childproc_setmode` with
//!   [`libxl_sigchld_owner_mainloop`]: libxl then never touches SIGCHLD, and
//!   the application calls `libxl_childproc_sigchld_occurred(ctx)` (libxl reaps
//!   only its own children) from a task driven by tokio's SIGCHLD stream,
//!   "NOT from within a signal handler" (libxl_event.h:491-494). That task must
//!   keep running while a *synchronous* libxl call blocks another thread, or
//!   the call never sees its helper exit. (libvirt instead uses
//!   `libxl_sigchld_owner_libxl_always_selective_reap`, fine when nothing
//!   else owns SIGCHLD.)
//! * **fork**: a child that does not `exec` must call
//!   `libxl_postfork_child_noexec` before any other libxl call
//!   (libxl_event.h:596-609).
//!
//! # Logging
//!
//! [`libxenlight_sys_logger_new`]`(callback, user, min_level)` returns a
//! `*mut xentoollog_logger` for `libxl_ctx_alloc`. Its `vmessage` formats
//! each message with `vsnprintf` and calls
//! `callback(user, level, errnoval, context, message)`
//! ([`libxenlight_sys_log_fn`]); progress reports arrive as `XTL_PROGRESS`.
//! The callback runs on whatever thread libxl logs from, possibly with libxl
//! locks held: it must be thread-safe, quick, must not call libxl, must not
//! unwind. Messages logged in a libxl-forked child before `exec` never reach
//! Rust (written to stderr instead). Destroy with
//! [`libxenlight_sys_logger_destroy`] after `libxl_ctx_free`.
//!
//! # What works without a hypervisor
//!
//! Checked on Debian 12 / Xen 4.17 without Xen running (`sys/tests/`):
//! `*_init`/`*_dispose`, `libxl_domain_build_info_init_type`, `libxl_uuid_*`,
//! `libxl_defbool_*`, `libxl_*_to_string`/`_from_string`, bitmaps,
//! xentoollog. **`libxl_ctx_alloc` does not**: it opens the privcmd
//! driver ("cannot open libxc handle", `ERROR_FAIL`, ctx NULL), so everything
//! taking a ctx, including `libxl_domain_config_from_json` and
//! `libxl_domain_config_to_json`, needs a Xen host (dom0). Those tests skip
//! without one, or fail if `LIBXENLIGHT_SYS_REQUIRE_XEN=1`. Never pass a NULL
//! ctx to them: it crashes. `sys/xen-test.sh` runs all the tests in dom0 of
//! the nested Xen host (`xen-host/run.sh`) with that variable set: there the
//! ctx tests pass too (JSON parse, `to_json`/`from_json` fixed point,
//! `libxl_list_domain`, `libxl_domid_to_name`, `libxl_event_check`).
//!
//! # Build requirements
//!
//! Headers (`libxen-dev`) and libclang (`libclang-dev`): the build script
//! checks both before running bindgen and stops with one line, e.g.
//! `libxenlight-sys: libxl.h not found: install libxen-dev and libclang-dev
//! (scripts/install-deps.sh xen)`. Headers are looked up in
//! `XENLIGHT_INCLUDE_DIR`, else `pkg-config --cflags xenlight`, else
//! `/usr/include` and `/usr/local/include`; libraries in `XENLIGHT_LIB_DIR`,
//! else `pkg-config --libs xenlight`, else the linker default. Links
//! `-lxenlight -lxentoollog` dynamically (xenctrl, xenstore, ... are
//! `DT_NEEDED` of libxenlight.so; nothing here calls them directly).
//!
//! # Regenerating / bindgen flags
//!
//! Like kvm-bindings, the bindgen setup is written down once, in
//! `bindgen_builder()` in `build.rs`; the exact command line of a build is
//! [`BINDGEN_FLAGS`]. Recorded for Xen 4.17.0, libclang 14.0.6:
//!
//! * bindgen **0.70.1** (workspace `bindgen = "0.70"`, locked in
//!   `Cargo.lock`; the build warns if another version generated the bindings),
//!   default features (`runtime`: libclang is loaded at build time);
//! * input `shim/shim.h` (includes `xentoollog.h`, `libxl.h`,
//!   `libxl_event.h`, `libxl_utils.h`, `libxl_uuid.h`),
//!   `-DLIBXL_API_VERSION=0x041400`, `-I` the header directories;
//! * `--rust-target 1.73` (below the workspace MSRV 1.75),
//!   `--formatter prettyplease`, `--merge-extern-blocks`,
//!   `--sort-semantically`, `--wrap-unsafe-ops` (for
//!   `unsafe_op_in_unsafe_fn = deny`), `--no-layout-tests` (the bindings are
//!   generated for the target by the same libclang that lays out the C
//!   structs; the test `layouts_match_c_compiler` instead compares key structs
//!   against the C compiler that builds the shim), `--no-derive-default`;
//! * enums: `--default-enum-style consts --no-prepend-enum-name`;
//!   unions: `--manually-drop-union '.*'`; `--no-copy '^libxl_<T>$'` for every
//!   IDL type `T` that has a `libxl_<T>_dispose` (found by scanning the headers);
//! * allowlist: functions `libxl_.*`, `xtl_.*`, `libxenlight_sys_.*`; types
//!   `libxl_.*`, `xentoollog_.*`, `libxenlight_sys_.*`; vars `LIBXL_.*`,
//!   `XTL_.*`, `libxl_.*`; blocklist: functions `libxl__.*` (libxl-internal),
//!   items `INVALID_DOMID|RANDOM_DOMID|LIBXL_EVENTMASK_ALL|LIBXL_MEMKB_DEFAULT|LIBXL_PCI_FUNC_ALL`
//!   (defined by hand below), types
//!   `FILE|_IO_.*|pollfd|timeval|pid_t|__pid_t|__time_t|__suseconds_t|__off_t|__off64_t`
//!   (taken from `libc` via `--raw-line 'use libc::{pid_t, pollfd, timeval, FILE};'`);
//! * comments: the shim's `@rustdoc` comments are Markdown; libxl's are kept
//!   verbatim in `text` blocks (no doctests, no broken links).
//!
//! To move to another API version or Xen release: read the `#if
//! LIBXL_API_VERSION` blocks of the new `libxl.h`, change `LIBXL_API_VERSION`
//! in `build.rs`, update this page, run `cargo test -p libxenlight-sys` and
//! `sys/xen-test.sh`.

#![warn(missing_docs)]

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    missing_docs,
    clippy::all
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub use bindings::*;

include!(concat!(env!("OUT_DIR"), "/build_info.rs"));

/// `INVALID_DOMID` (`~0`, libxl.h:1667) as the `uint32_t` domid it is used as.
pub const INVALID_DOMID: u32 = !0;
/// `RANDOM_DOMID` (`INVALID_DOMID - 1`, libxl.h:1668): in
/// `libxl_domain_create_info.domid`, asks libxl to pick a random domid.
pub const RANDOM_DOMID: u32 = INVALID_DOMID - 1;
/// `LIBXL_EVENTMASK_ALL` (`~(unsigned long)0`, libxl_event.h:31): the
/// `typemask` of `libxl_event_check`/`_wait` matching every event type.
pub const LIBXL_EVENTMASK_ALL: u64 = !0;
/// `LIBXL_MEMKB_DEFAULT` (`~0ULL`, libxl.h:1489): "let libxl choose" for
/// memkb fields.
pub const LIBXL_MEMKB_DEFAULT: u64 = !0;
/// `LIBXL_PCI_FUNC_ALL` (`~0U`, libxl.h:1445).
pub const LIBXL_PCI_FUNC_ALL: u32 = !0;
/// `LIBXL_MAX_GRANT_DEFAULT` (`~(uint32_t)0`, libxl.h:367).
pub const LIBXL_MAX_GRANT_DEFAULT: u32 = !0;
/// `LIBXL_CPUTOPOLOGY_INVALID_ENTRY` (`~(uint32_t)0`, libxl.h:2001).
pub const LIBXL_CPUTOPOLOGY_INVALID_ENTRY: u32 = !0;
/// `LIBXL_PCITOPOLOGY_INVALID_ENTRY` (`~(uint32_t)0`, libxl.h:2005).
pub const LIBXL_PCITOPOLOGY_INVALID_ENTRY: u32 = !0;
/// `LIBXL_NUMAINFO_INVALID_ENTRY` (`~(uint32_t)0`, libxl.h:2009).
pub const LIBXL_NUMAINFO_INVALID_ENTRY: u32 = !0;
