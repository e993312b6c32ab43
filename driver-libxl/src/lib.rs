//! # domkit-libxl
//!
//! The Xen driver of domkit, on top of libxenlight (`libxenlight-sys`). It implements the core
//! [`domkit_core::Driver`] / [`domkit_core::Domain`] traits with the uniform semantics of
//! `docs/semantics.md`; the libxl-specific mapping is §9 there, and [`translate`] here.
//!
//! ## Modules
//! - [`context`]: [`Context`], the safe owner of a `libxl_ctx` (logger -> `tracing`, event
//!   loop thread, SIGCHLD) and the blocking libxl calls;
//! - [`config`]: pure [`domkit_core::DomainConfig`] -> libxl JSON domain config;
//! - [`translate`]: pure libxl event / returned call -> core [`domkit_core::Observation`];
//! - [`savefile`]: the save file (header + libxl stream);
//! - [`reattach`]: pure: what a new manager makes of a stored domain and the Xen domain it
//!   finds (`docs/semantics.md` §11.3, §11.4);
//! - [`stats`]: pure: libxl's and dom0's figures -> [`domkit_core::DomainStats`] (§12.5);
//! - [`observe`]: the I/O beside it: the libxl calls and sysfs reads behind a stats
//!   record, and the console pump between xenconsoled's pty and a
//!   [`domkit_core::ConsoleHub`] (§12.4);
//! - [`ephemeral`]: the reaper and markers that make an ephemeral driver's domains die with
//!   its process (§11.0);
//! - [`LibxlDomain`] / [`LibxlDriver`]: the trait implementations.
//!
//! ## Design choices
//!
//! **Events: callbacks + our own poll loop.** `libxl_event_register_callbacks` with
//! `event_occurs_mask = all`: libxl hands every event to the `event_occurs` hook on whatever
//! thread happens to be inside libxl when the event is generated: the loop thread, or a
//! thread blocked in a synchronous libxl call (a save generates its own `SHUTDOWN{suspend}`).
//! The hook copies the event, frees it and sends it on a channel to the dispatcher thread,
//! which routes it by the death watch's `for_user` token to its domain, in order.
//! A dedicated loop thread drives libxl's fds and timeouts whenever no other thread is in
//! libxl: `libxl_osevent_beforepoll` + `poll(2)` (plus a self-pipe to stop it) +
//! `libxl_osevent_afterpoll`. It sleeps in `poll`: no busy polling. Not chosen:
//! - `libxl_event_wait` in a thread: in Xen 4.17 an event queued by *another* thread does
//!   not wake a waiter (`libxl__event_occurred` pokes `CTX->pollers_event`, which nothing
//!   registers), so events generated inside a synchronous call could sit unseen until some
//!   other fd activity; and it cannot be woken to stop;
//! - `libxl_osevent_register_hooks` on tokio's reactor: workable, but libxl calls the hooks
//!   with its locks held and forbids reentrant calls, tokio's `AsyncFd` cannot share an fd
//!   registered twice, and every test runtime would own a slice of libxl's fds. One
//!   thread in `poll` is simpler and costs nothing measurable.
//!
//! **SIGCHLD: `libxl_sigchld_owner_mainloop`.** libxl forks helpers (save/restore helper,
//! hotplug scripts). Its default mode installs a SIGCHLD handler and asserts none was there
//! before, which aborts under tokio (tokio::process, the QEMU driver). In mainloop mode libxl
//! never touches SIGCHLD; a dedicated thread running a one-thread tokio runtime waits on
//! `tokio::signal::unix::signal(SIGCHLD)` and calls `libxl_childproc_sigchld_occurred`
//! (libxl then `waitpid`s only its own children, so `tokio::process` and `std::process` keep
//! theirs). It has its own runtime so that it keeps running while callers' runtimes come and
//! go (each `#[tokio::test]` has one) and while synchronous libxl calls block other threads.
//!
//! **Calls: synchronous, on blocking threads.** Every libxl call is made with
//! `ao_how = NULL` (libxl runs its own event loop in the calling thread until done) on a
//! `spawn_blocking` thread (API operations) or a `domkit-libxl-policy` thread (policy
//! actions). Asynchronous ao callbacks would save threads but make every operation a
//! callback state machine; a domain has at most one operation in flight, so a blocked thread
//! per operation is cheap. An API operation's whole sequence (e.g. suspend, fsync, rename,
//! destroy, or resume after a failure) runs in one blocking closure under the domain's
//! operation lock, so dropping the caller's future never leaves it half done.
//!
//! **Destroy preempts** (`docs/semantics.md` §6.0). `destroy()` never takes the operation
//! lock: libxl's ctx is thread-safe, so it calls `libxl_domain_destroy` from its own
//! blocking thread while a save, a shutdown's 60 s acknowledgement wait or any hung call
//! holds the lock. The preempted libxl call fails or returns, and the operation reports
//! `Error::Interrupted { by: destroy }`. A save commits its file and stashes
//! `SaveCommitted` in one step under the lifecycle lock, where destroy stashes `Destroy`:
//! whichever comes first decides whether the end is `saved` (file kept) or `destroyed` (no
//! file). Shutdown and reboot send the request under the lock and wait for the guest in
//! the caller's future.
//!
//! **Config: JSON.** See [`config`]: the pure mapping builds libxl's JSON and
//! `libxl_domain_config_from_json` loads it.
//!
//! **Save layout.** See [`savefile`]: header, then libxl's stream at the following offset.
//!
//! **Identity.** The libxl domain's name and uuid are domkit's; a restart (reboot, crash with
//! `on_crash = restart`, `reset()`) and a restore create a new domid with the same name and
//! uuid. Events of an old domid are dropped: each domid gets its own death watch with a fresh
//! token, and the dispatcher only delivers events whose token is the domain's current one.
//!
//! **Durable domains** (`docs/semantics.md` §11). [`LibxlOptions::ownership`]:
//! - *persistent* ([`LibxlDriver::open`] with [`LibxlOptions::persistent`]): definitions and
//!   a status per domain (last `seq`, state, a save in flight) in the state root
//!   (`domkit_core::store`), rewritten atomically with every event before it is published;
//!   Xen domains outlive the process (as they do anyway). The next driver adopts each Xen
//!   domain by its stored uuid, re-arms the death watch on its current domid and reconciles
//!   `libxl_domain_info` through [`reattach::plan`] (events marked `reconciled`, policies
//!   applied as if seen live). One manager per root: `flock` on `<state root>/lock`.
//! - *ephemeral* (default, [`LibxlDriver::new`]): Xen domains would outlive the process, so a
//!   forked reaper destroys them when the process dies ([`ephemeral`]), a dropped driver
//!   destroys them, and the next ephemeral driver on the runtime root removes what a dead
//!   one left. One manager per runtime root.
//!
//! FFI and process ownership added for this: the reaper is forked with `libc::fork` (twice,
//! so that it is nobody's child here) and only ever calls async-signal-safe functions on
//! memory prepared before the fork; the manager owns the pipe's write end (`O_CLOEXEC`, an
//! `OwnedFd` in the driver) and nothing else of the reaper's; the reaper owns the read end
//! and execs `xl destroy <name>` with an argv built from names the driver validated
//! (`domkit_core::config::validate_name`: at most 64 bytes, no `/`), never through a shell.
//!
//! ## Unsupported
//! ACPI shutdown/reboot modes (PV/PVH guests have no ACPI power button), the agent mode for a
//! domain without a guest agent channel, `pm_suspend(disk)`, per-domain console log paths and more than one console
//! (xenconsoled owns console 0), user-mode NICs, PVH on hosts without HVM capability,
//! disk boot of PVH guests. Each returns `Error::Unsupported` with the reason.

#![warn(missing_docs, missing_debug_implementations)]

pub(crate) mod agent;
pub mod config;
pub mod context;
pub mod devices;
mod domain;
mod driver;
pub mod ephemeral;
pub mod observe;
pub mod reattach;
pub mod savefile;
pub mod stats;
pub mod translate;

pub use context::{Context, DomInfo, LibxlError};
pub use domain::{LibxlDomain, BACKEND};
pub use domkit_core::Ownership;
pub use driver::{default_runtime_root, default_state_root, LibxlDriver, LibxlOptions};
