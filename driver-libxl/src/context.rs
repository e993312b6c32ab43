//! [`Context`]: the safe owner of one `libxl_ctx`, its xentoollog logger, its event loop
//! thread and its SIGCHLD listener; plus the blocking libxl calls the driver makes.
//!
//! Threads (see the crate docs for why):
//! - `domkit-libxl-loop`: drives libxl's fds and timeouts with `libxl_osevent_beforepoll`,
//!   `poll(2)` and `libxl_osevent_afterpoll`; it sleeps in `poll` (no busy polling) and is
//!   woken through a self-pipe to stop.
//! - `domkit-libxl-sigchld`: a one-thread tokio runtime waiting on tokio's SIGCHLD stream; on
//!   each signal it calls `libxl_childproc_sigchld_occurred` (libxl reaps only its own children:
//!   `libxl_sigchld_owner_mainloop`).
//!
//! libxl events are delivered through `libxl_event_register_callbacks`: the `event_occurs`
//! hook runs on whatever thread libxl happens to run (the loop thread, or a thread inside a
//! synchronous libxl call), copies the event into a [`LibxlEvent`], frees it, and sends it to
//! the channel returned by [`Context::new`]. Every long libxl call here is synchronous
//! (`ao_how = NULL`) and must run on a blocking thread (`spawn_blocking`, or a driver thread).

use crate::stats::{DomUsage, VcpuUsage};
use crate::translate::{LibxlEvent, LibxlEventKind};
use libxenlight_sys as sys;
use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A libxl call that failed: which call, libxl's error code, and the error messages libxl
/// logged meanwhile (libxl's return codes alone say little: `FAIL` is the usual one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibxlError {
    /// The libxl function, e.g. `libxl_domain_create_new`.
    pub call: &'static str,
    /// The `ERROR_*` code returned (negative), or 0 when the call returned no code.
    pub code: i32,
    /// The ERROR/CRITICAL messages libxl logged during the call (possibly from other
    /// concurrent calls too), newest last; empty if none.
    pub detail: String,
}

impl LibxlError {
    /// The symbolic name of [`LibxlError::code`] (`"FAIL"`, `"DOMAIN_NOTFOUND"`, ...).
    pub fn code_name(&self) -> String {
        // SAFETY: libxl_error_to_string takes any int and returns NULL or a pointer to a
        // static NUL-terminated string, which we only read.
        let p = unsafe { sys::libxl_error_to_string(self.code) };
        if p.is_null() {
            format!("{}", self.code)
        } else {
            // SAFETY: non-NULL pointers from libxl_error_to_string are static C strings.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    /// True when libxl says the domain does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        self.code == sys::ERROR_DOMAIN_NOTFOUND || self.code == sys::ERROR_NOTFOUND
    }
}

impl fmt::Display for LibxlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed with {}", self.call, self.code_name())?;
        if !self.detail.is_empty() {
            write!(f, " (libxl: {})", self.detail)?;
        }
        Ok(())
    }
}

impl std::error::Error for LibxlError {}

/// What the context reports to its owner, in order, on the channel from [`Context::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextEvent {
    /// A libxl event (already copied out of libxl's struct and freed).
    Libxl(LibxlEvent),
    /// libxl's `disaster` hook: event machinery broke; events may be missing from now on.
    Disaster(String),
}

/// How many recent libxl error messages are kept for [`LibxlError::detail`].
const ERROR_LOG_LEN: usize = 16;

/// Recent ERROR/CRITICAL messages, numbered, so a call can collect the ones logged during it.
#[derive(Debug, Default)]
struct ErrorLog {
    next: u64,
    entries: VecDeque<(u64, String)>,
}

/// What the logger callback's `user` pointer points to.
#[derive(Debug)]
struct LoggerState {
    errors: Mutex<ErrorLog>,
}

/// What the event hooks' `user` pointer points to.
#[derive(Debug)]
struct HookState {
    tx: Mutex<mpsc::Sender<ContextEvent>>,
    broken: Mutex<Option<String>>,
}

/// A raw libxl_ctx pointer that may cross threads.
#[derive(Debug, Clone, Copy)]
struct CtxPtr(*mut sys::libxl_ctx);
// SAFETY: libxl.h:565 "struct libxl_ctx* is threadsafe": every libxl function taking it may be
// called from any thread, concurrently; the pointer is only dereferenced by libxl.
unsafe impl Send for CtxPtr {}
// SAFETY: as above; sharing the pointer value between threads is what libxl allows.
unsafe impl Sync for CtxPtr {}

impl CtxPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut sys::libxl_ctx {
        self.0
    }
}

/// The shared part of a [`Context`]; freed (threads stopped, ctx freed, logger destroyed) when
/// the last [`Context`] clone and the last [`DeathWatch`] are gone.
struct Shared {
    ctx: CtxPtr,
    logger: *mut sys::xentoollog_logger,
    logger_state: *mut LoggerState,
    hook_state: *mut HookState,
    event_hooks: *mut sys::libxl_event_hooks,
    childproc_hooks: *mut sys::libxl_childproc_hooks,
    stop: Arc<AtomicBool>,
    wake_w: OwnedFd,
    loop_thread: Mutex<Option<JoinHandle<()>>>,
    sigchld: Mutex<Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>>,
}

// SAFETY: the raw pointers are owned by Shared (Box::into_raw / libxl allocations) and only
// freed in Drop; the pointees are thread-safe: libxl_ctx is threadsafe (libxl.h:565), the
// shim logger is documented thread-safe (shim.h), LoggerState and HookState are made of
// Mutexes, and the hooks structs are never written after registration.
unsafe impl Send for Shared {}
// SAFETY: see Send: all shared access goes through thread-safe pointees or Mutexes.
unsafe impl Sync for Shared {}

/// The safe owner of one `libxl_ctx` (cheap to clone; all clones share it).
///
/// Thread safety: libxl documents the ctx as thread-safe (libxl.h:565), so `Context` is
/// `Send + Sync` and its methods may be called from any thread, concurrently. Methods that
/// wait for the guest or for libxl's helpers (create, suspend, restore, destroy, shutdown,
/// ...) block: call them from blocking threads.
#[derive(Clone)]
pub struct Context {
    shared: Arc<Shared>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("ctx", &self.shared.ctx.0)
            .finish_non_exhaustive()
    }
}

fn tracing_xtl_level() -> sys::xentoollog_level {
    use tracing::level_filters::LevelFilter;
    let current = LevelFilter::current();
    if current >= LevelFilter::TRACE {
        sys::XTL_DEBUG
    } else if current >= LevelFilter::DEBUG {
        sys::XTL_DETAIL
    } else {
        sys::XTL_INFO
    }
}

/// The xentoollog callback: forwards to `tracing` (target `libxl`) and remembers errors.
unsafe extern "C" fn log_callback(
    user: *mut c_void,
    level: sys::xentoollog_level,
    errnoval: c_int,
    context: *const c_char,
    message: *const c_char,
) {
    let _ = std::panic::catch_unwind(|| {
        if message.is_null() {
            return;
        }
        // SAFETY: the shim passes a NUL-terminated message valid for this call (shim.h).
        let msg = unsafe { CStr::from_ptr(message) }.to_string_lossy();
        let lib = if context.is_null() {
            std::borrow::Cow::Borrowed("xtl")
        } else {
            // SAFETY: a non-NULL context is a NUL-terminated string valid for this call.
            unsafe { CStr::from_ptr(context) }.to_string_lossy()
        };
        match level {
            sys::XTL_DEBUG => {
                tracing::trace!(target: "libxl", lib = %lib, errno = errnoval, "{msg}")
            }
            sys::XTL_VERBOSE | sys::XTL_DETAIL | sys::XTL_PROGRESS => {
                tracing::debug!(target: "libxl", lib = %lib, errno = errnoval, "{msg}")
            }
            sys::XTL_INFO | sys::XTL_NOTICE => {
                tracing::info!(target: "libxl", lib = %lib, errno = errnoval, "{msg}")
            }
            sys::XTL_WARN => tracing::warn!(target: "libxl", lib = %lib, errno = errnoval, "{msg}"),
            _ => tracing::error!(target: "libxl", lib = %lib, errno = errnoval, "{msg}"),
        }
        if level >= sys::XTL_ERROR && !user.is_null() {
            // SAFETY: user is the LoggerState owned by Shared, which outlives the logger.
            let state = unsafe { &*(user as *const LoggerState) };
            let mut log = state.errors.lock().unwrap_or_else(|p| p.into_inner());
            let n = log.next;
            log.next += 1;
            let mut text = msg.into_owned();
            if errnoval > 0 {
                text.push_str(&format!(
                    ": {}",
                    std::io::Error::from_raw_os_error(errnoval)
                ));
            }
            log.entries.push_back((n, text));
            while log.entries.len() > ERROR_LOG_LEN {
                log.entries.pop_front();
            }
        }
    });
}

/// libxl's `event_occurs` hook: copy the event out, free it, send it on.
unsafe extern "C" fn event_occurs(user: *mut c_void, event: *mut sys::libxl_event) {
    let _ = std::panic::catch_unwind(|| {
        if event.is_null() || user.is_null() {
            return;
        }
        // SAFETY: libxl hands us ownership of a valid event (libxl_event.h:84-85).
        let ev = unsafe { &*event };
        let kind = match ev.type_ {
            sys::LIBXL_EVENT_TYPE_DOMAIN_SHUTDOWN => LibxlEventKind::DomainShutdown {
                // SAFETY: for DOMAIN_SHUTDOWN events the union holds domain_shutdown.
                reason: unsafe { ev.u.domain_shutdown.shutdown_reason },
            },
            sys::LIBXL_EVENT_TYPE_DOMAIN_DEATH => LibxlEventKind::DomainDeath,
            other => LibxlEventKind::Other {
                event_type: other as i32,
            },
        };
        let copy = LibxlEvent {
            domid: ev.domid,
            for_user: ev.for_user,
            kind,
        };
        // SAFETY: the event is ours to free (libxl_event.h:84-85) and not used afterwards;
        // libxl allows calling libxl from event_occurs (libxl_event.h:118).
        unsafe { sys::libxl_event_free(ptr::null_mut(), event) };
        // SAFETY: user is the HookState owned by Shared, which outlives the ctx.
        let state = unsafe { &*(user as *const HookState) };
        let tx = state.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(ContextEvent::Libxl(copy));
    });
}

/// libxl's `disaster` hook: record and report (instead of libxl's default `exit(-1)`).
unsafe extern "C" fn disaster(
    user: *mut c_void,
    type_: sys::libxl_event_type,
    msg: *const c_char,
    errnoval: c_int,
) {
    let _ = std::panic::catch_unwind(|| {
        let text = if msg.is_null() {
            "unknown".to_string()
        } else {
            // SAFETY: libxl passes a NUL-terminated message valid for this call.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        let text = format!(
            "libxl event machinery disaster (event type {type_}, errno {errnoval}): {text}"
        );
        tracing::error!(target: "libxl", "{text}");
        if user.is_null() {
            return;
        }
        // SAFETY: user is the HookState owned by Shared.
        let state = unsafe { &*(user as *const HookState) };
        *state.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.clone());
        let _ = state
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(ContextEvent::Disaster(text));
    });
}

fn now_timeval() -> libc::timeval {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    }
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The loop thread: drive libxl's fds/timeouts until `stop` is set and the pipe pokes us.
fn event_loop(ctx: CtxPtr, wake_r: OwnedFd, stop: Arc<AtomicBool>) {
    let mut fds: Vec<libc::pollfd> = vec![
        libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0
        };
        16
    ];
    while !stop.load(Ordering::Acquire) {
        let mut nfds: c_int;
        let mut timeout: c_int;
        loop {
            nfds = (fds.len() - 1) as c_int;
            timeout = -1;
            // SAFETY: fds[1..] has room for nfds pollfds; libxl fills at most that many (or
            // returns ERROR_BUFFERFULL with the size it needs). Only this thread uses the
            // beforepoll/afterpoll interface (libxl_event.h:266-269).
            let rc = unsafe {
                sys::libxl_osevent_beforepoll(
                    ctx.get(),
                    &mut nfds,
                    fds.as_mut_ptr().add(1).cast(),
                    &mut timeout,
                    now_timeval(),
                )
            };
            if rc == sys::ERROR_BUFFERFULL {
                fds.resize(nfds as usize + 1, fds[0]);
                continue;
            }
            if rc != 0 {
                tracing::error!(rc, "libxl_osevent_beforepoll failed; retrying in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
                nfds = 0;
                timeout = 0;
            }
            break;
        }
        fds[0] = libc::pollfd {
            fd: wake_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: fds holds nfds + 1 initialised pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds as libc::nfds_t + 1, timeout) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll failed in the libxl event loop");
            }
            continue;
        }
        if fds[0].revents != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: reading into a local buffer from our own non-blocking pipe.
            while unsafe { libc::read(wake_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0
            {
            }
        }
        // SAFETY: nfds and fds[1..=nfds] are those of the most recent beforepoll, as
        // modified by poll (libxl_event.h:266).
        unsafe {
            sys::libxl_osevent_afterpoll(ctx.get(), nfds, fds.as_ptr().add(1).cast(), now_timeval())
        };
    }
}

impl Context {
    /// Open libxl (needs a Xen dom0 with privcmd), register the logger, event hooks and
    /// SIGCHLD handling, and start the event-loop and SIGCHLD threads. Events arrive on the
    /// returned channel.
    pub fn new() -> Result<(Context, mpsc::Receiver<ContextEvent>), LibxlError> {
        let fail = |call: &'static str, detail: String| LibxlError {
            call,
            code: sys::ERROR_FAIL,
            detail,
        };
        let logger_state = Box::into_raw(Box::new(LoggerState {
            errors: Mutex::new(ErrorLog::default()),
        }));
        // SAFETY: log_callback is a non-unwinding extern "C" fn; logger_state lives until the
        // logger is destroyed (Shared::drop, or the error paths below).
        let logger = unsafe {
            sys::libxenlight_sys_logger_new(
                Some(log_callback),
                logger_state.cast(),
                tracing_xtl_level(),
            )
        };
        if logger.is_null() {
            // SAFETY: logger_state came from Box::into_raw and nothing else holds it.
            drop(unsafe { Box::from_raw(logger_state) });
            return Err(fail("libxenlight_sys_logger_new", "out of memory".into()));
        }
        let mut ctx: *mut sys::libxl_ctx = ptr::null_mut();
        // SAFETY: ctx is a valid out pointer; the logger outlives the ctx (freed after it).
        let rc = unsafe { sys::libxl_ctx_alloc(&mut ctx, sys::LIBXL_VERSION as c_int, 0, logger) };
        if rc != 0 || ctx.is_null() {
            let detail = take_errors(logger_state, 0);
            // SAFETY: no ctx uses the logger (alloc failed); then free its state.
            unsafe {
                sys::libxenlight_sys_logger_destroy(logger);
                drop(Box::from_raw(logger_state));
            }
            return Err(LibxlError {
                call: "libxl_ctx_alloc",
                code: rc,
                detail: if detail.is_empty() {
                    "cannot open libxl: is this a Xen dom0 with xenfs/privcmd and xenstored?".into()
                } else {
                    format!("{detail} (is this a Xen dom0 with xenfs/privcmd and xenstored?)")
                },
            });
        }
        let (tx, rx) = mpsc::channel();
        let hook_state = Box::into_raw(Box::new(HookState {
            tx: Mutex::new(tx),
            broken: Mutex::new(None),
        }));
        let event_hooks = Box::into_raw(Box::new(sys::libxl_event_hooks {
            event_occurs_mask: sys::LIBXL_EVENTMASK_ALL,
            event_occurs: Some(event_occurs),
            disaster: Some(disaster),
        }));
        let childproc_hooks = Box::into_raw(Box::new(sys::libxl_childproc_hooks {
            chldowner: sys::libxl_sigchld_owner_mainloop,
            fork_replacement: None,
            reaped_callback: None,
        }));
        // SAFETY: right after ctx_alloc, before the ctx is shared, no other libxl call runs
        // (libxl_event.h:123-128, 546-550); hooks and user pointers outlive the ctx (freed
        // after libxl_ctx_free in Shared::drop).
        unsafe {
            sys::libxl_event_register_callbacks(ctx, event_hooks, hook_state.cast());
            sys::libxl_childproc_setmode(ctx, childproc_hooks, ptr::null_mut());
        }
        let (wake_r, wake_w) = match pipe_cloexec() {
            Ok(p) => p,
            Err(e) => {
                free_raw(
                    ctx,
                    logger,
                    logger_state,
                    hook_state,
                    event_hooks,
                    childproc_hooks,
                );
                return Err(fail("pipe2", e.to_string()));
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let cp = CtxPtr(ctx);
        let stop2 = stop.clone();
        let loop_thread = std::thread::Builder::new()
            .name("domkit-libxl-loop".into())
            .spawn(move || event_loop(cp, wake_r, stop2));
        let loop_thread = match loop_thread {
            Ok(t) => t,
            Err(e) => {
                free_raw(
                    ctx,
                    logger,
                    logger_state,
                    hook_state,
                    event_hooks,
                    childproc_hooks,
                );
                return Err(fail("spawning the libxl event thread", e.to_string()));
            }
        };
        let shared = Shared {
            ctx: cp,
            logger,
            logger_state,
            hook_state,
            event_hooks,
            childproc_hooks,
            stop,
            wake_w,
            loop_thread: Mutex::new(Some(loop_thread)),
            sigchld: Mutex::new(None),
        };
        // From here on, Shared::drop cleans up.
        let shared = Arc::new(shared);
        let sig = spawn_sigchld_thread(cp)
            .map_err(|e| fail("installing the SIGCHLD listener", e.to_string()))?;
        *shared.sigchld.lock().unwrap_or_else(|p| p.into_inner()) = Some(sig);
        Ok((Context { shared }, rx))
    }

    fn ptr(&self) -> *mut sys::libxl_ctx {
        self.shared.ctx.0
    }

    fn error_mark(&self) -> u64 {
        // SAFETY: logger_state lives as long as Shared.
        let state = unsafe { &*self.shared.logger_state };
        state.errors.lock().unwrap_or_else(|p| p.into_inner()).next
    }

    fn error(&self, call: &'static str, code: c_int, mark: u64) -> LibxlError {
        LibxlError {
            call,
            code,
            detail: take_errors(self.shared.logger_state, mark),
        }
    }

    /// `Some(reason)` once libxl reported a disaster in its event machinery.
    pub fn broken(&self) -> Option<String> {
        // SAFETY: hook_state lives as long as Shared.
        let state = unsafe { &*self.shared.hook_state };
        state
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Parse libxl's JSON domain config (`libxl_domain_config_from_json`) and print it back
    /// (`libxl_domain_config_to_json`): what libxl made of it.
    pub fn config_roundtrip_json(&self, json: &str) -> Result<String, LibxlError> {
        let mark = self.error_mark();
        let mut cfg = DomainConfigBuf::from_json(self, json)?;
        // SAFETY: cfg is initialised; the result is malloc'ed (freed below) or NULL.
        let p = unsafe { sys::libxl_domain_config_to_json(self.ptr(), cfg.as_mut_ptr()) };
        if p.is_null() {
            return Err(self.error("libxl_domain_config_to_json", sys::ERROR_FAIL, mark));
        }
        // SAFETY: p is a NUL-terminated malloc'ed string; we copy it, then free it.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: p came from malloc inside libxl and is not used again.
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }

    /// Create a domain from libxl JSON (`libxl_domain_create_new`, synchronous). libxl leaves
    /// the new domain paused; unpause it to run it. Blocks for the whole build.
    pub fn create_new(&self, json: &str) -> Result<u32, LibxlError> {
        let mark = self.error_mark();
        let mut cfg = DomainConfigBuf::from_json(self, json)?;
        let mut domid: u32 = sys::INVALID_DOMID;
        // SAFETY: cfg is an initialised config, domid a valid out pointer; NULL ao_how makes
        // the call synchronous, so both only need to live for the call.
        let rc = unsafe {
            sys::libxl_domain_create_new(
                self.ptr(),
                cfg.as_mut_ptr(),
                &mut domid,
                ptr::null(),
                ptr::null(),
            )
        };
        if rc != 0 {
            return Err(self.error("libxl_domain_create_new", rc, mark));
        }
        Ok(domid)
    }

    /// Restore a domain from `fd` at its current offset (`libxl_domain_create_restore`,
    /// synchronous). The domain is left paused.
    pub fn create_restore(&self, json: &str, fd: RawFd) -> Result<u32, LibxlError> {
        let mark = self.error_mark();
        let mut cfg = DomainConfigBuf::from_json(self, json)?;
        let mut params = std::mem::MaybeUninit::<sys::libxl_domain_restore_params>::uninit();
        // SAFETY: init writes a valid default value (libxl.h:684-691).
        unsafe { sys::libxl_domain_restore_params_init(params.as_mut_ptr()) };
        // SAFETY: initialised just above; a plain integer field.
        // The stream libxl_domain_suspend writes is migration stream v2. The default (1)
        // means "legacy xl format": libxl would pipe the file through convert-legacy-stream.
        unsafe { (*params.as_mut_ptr()).stream_version = 2 };
        let mut domid: u32 = sys::INVALID_DOMID;
        // SAFETY: all pointers are valid for the (synchronous: ao_how NULL) call; fd is an
        // open file the caller keeps open across the call; send_back_fd -1 = none.
        let rc = unsafe {
            sys::libxl_domain_create_restore(
                self.ptr(),
                cfg.as_mut_ptr(),
                &mut domid,
                fd,
                -1,
                params.as_ptr(),
                ptr::null(),
                ptr::null(),
            )
        };
        // SAFETY: params was initialised and is disposed exactly once.
        unsafe { sys::libxl_domain_restore_params_dispose(params.as_mut_ptr()) };
        if rc != 0 {
            return Err(self.error("libxl_domain_create_restore", rc, mark));
        }
        Ok(domid)
    }

    /// Soft-reset a domain (`libxl_domain_soft_reset`), rebuilding it from the JSON config.
    pub fn soft_reset(&self, json: &str, domid: u32) -> Result<(), LibxlError> {
        let mark = self.error_mark();
        let mut cfg = DomainConfigBuf::from_json(self, json)?;
        // SAFETY: valid ctx and initialised config; synchronous call.
        let rc = unsafe {
            sys::libxl_domain_soft_reset(
                self.ptr(),
                cfg.as_mut_ptr(),
                domid,
                ptr::null(),
                ptr::null(),
            )
        };
        if rc != 0 {
            return Err(self.error("libxl_domain_soft_reset", rc, mark));
        }
        Ok(())
    }

    /// Hot-add a disk to the running domain `domid` (`libxl_device_disk_add`, synchronous:
    /// returns once the backend is connected and the hotplug script ran). `json`: one
    /// `libxl_device_disk` as [`crate::devices::disk_json`] writes it.
    pub fn disk_add(&self, domid: u32, json: &str) -> Result<(), LibxlError> {
        self.device_call(
            json,
            DeviceCall {
                name: "libxl_device_disk_add",
                init: sys::libxl_device_disk_init,
                from_json: sys::libxl_device_disk_from_json,
                dispose: sys::libxl_device_disk_dispose,
                call: sys::libxl_device_disk_add,
            },
            domid,
        )
    }

    /// Remove a disk gracefully (`libxl_device_disk_remove`, synchronous): libxl asks the
    /// frontend to close and waits for the backend to reach `Closed` (libxl's own 10 s
    /// timeout, after which it forces the removal), then runs the hotplug script. `json`
    /// names the disk by its `vdev`.
    pub fn disk_remove(&self, domid: u32, json: &str) -> Result<(), LibxlError> {
        self.device_call(
            json,
            DeviceCall {
                name: "libxl_device_disk_remove",
                init: sys::libxl_device_disk_init,
                from_json: sys::libxl_device_disk_from_json,
                dispose: sys::libxl_device_disk_dispose,
                call: sys::libxl_device_disk_remove,
            },
            domid,
        )
    }

    /// Hot-add a vif (`libxl_device_nic_add`, synchronous). `json`: one `libxl_device_nic`.
    pub fn nic_add(&self, domid: u32, json: &str) -> Result<(), LibxlError> {
        self.device_call(
            json,
            DeviceCall {
                name: "libxl_device_nic_add",
                init: sys::libxl_device_nic_init,
                from_json: sys::libxl_device_nic_from_json,
                dispose: sys::libxl_device_nic_dispose,
                call: sys::libxl_device_nic_add,
            },
            domid,
        )
    }

    /// Remove a vif gracefully (`libxl_device_nic_remove`, synchronous; as
    /// [`Context::disk_remove`]). `json` names the vif by its `devid`.
    pub fn nic_remove(&self, domid: u32, json: &str) -> Result<(), LibxlError> {
        self.device_call(
            json,
            DeviceCall {
                name: "libxl_device_nic_remove",
                init: sys::libxl_device_nic_init,
                from_json: sys::libxl_device_nic_from_json,
                dispose: sys::libxl_device_nic_dispose,
                call: sys::libxl_device_nic_remove,
            },
            domid,
        )
    }

    /// One device call: an owned libxl device struct (init, filled from `json`, disposed
    /// after the call on every path), passed to `call` with NULL ao_how (synchronous).
    fn device_call<T>(&self, json: &str, f: DeviceCall<T>, domid: u32) -> Result<(), LibxlError> {
        let mark = self.error_mark();
        let c = CString::new(json).map_err(|_| LibxlError {
            call: f.name,
            code: sys::ERROR_INVAL,
            detail: "the JSON device contains a NUL byte".into(),
        })?;
        let mut dev = Box::new(std::mem::MaybeUninit::<T>::uninit());
        // SAFETY: `init` writes a valid empty value of T (libxl.h:684-691: every IDL type
        // has init/dispose; dispose of an initialised value is always safe).
        unsafe { (f.init)(dev.as_mut_ptr()) };
        // SAFETY: valid ctx, initialised T, NUL-terminated JSON; libxl owns (and `dispose`
        // frees) the strings it allocates into T.
        let rc = unsafe { (f.from_json)(self.ptr(), dev.as_mut_ptr(), c.as_ptr()) };
        let rc = if rc != 0 {
            Err(self.error("libxl_device_*_from_json", rc, mark))
        } else {
            // SAFETY: valid ctx and an initialised device; NULL ao_how makes the call
            // synchronous, so `dev` only needs to live for the call (libxl copies what it
            // keeps into xenstore and its own JSON record).
            let rc = unsafe { (f.call)(self.ptr(), domid, dev.as_mut_ptr(), ptr::null()) };
            if rc != 0 {
                Err(self.error(f.name, rc, mark))
            } else {
                Ok(())
            }
        };
        // SAFETY: initialised above, disposed exactly once, not used afterwards.
        unsafe { (f.dispose)(dev.as_mut_ptr()) };
        rc
    }

    fn simple(
        &self,
        call: &'static str,
        f: impl FnOnce(*mut sys::libxl_ctx) -> c_int,
    ) -> Result<(), LibxlError> {
        let mark = self.error_mark();
        let rc = f(self.ptr());
        if rc != 0 {
            return Err(self.error(call, rc, mark));
        }
        Ok(())
    }

    /// `libxl_domain_pause` (synchronous; libxl emits no event for it).
    pub fn pause(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_pause", |c| unsafe {
            sys::libxl_domain_pause(c, domid, ptr::null())
        })
    }

    /// `libxl_domain_unpause` (synchronous; no event).
    pub fn unpause(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_unpause", |c| unsafe {
            sys::libxl_domain_unpause(c, domid, ptr::null())
        })
    }

    /// `libxl_domain_shutdown`: writes the PV control request and waits (up to libxl's 60 s)
    /// for the guest to acknowledge it. `Ok` = the request reached the guest.
    pub fn shutdown(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_shutdown", |c| unsafe {
            sys::libxl_domain_shutdown(c, domid, ptr::null())
        })
    }

    /// `libxl_domain_reboot`: like [`Context::shutdown`] with a reboot request.
    pub fn reboot(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_reboot", |c| unsafe {
            sys::libxl_domain_reboot(c, domid, ptr::null())
        })
    }

    /// `libxl_domain_destroy` (synchronous: returns once the domain and its devices are gone).
    pub fn destroy(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_destroy", |c| unsafe {
            sys::libxl_domain_destroy(c, domid, ptr::null())
        })
    }

    /// `libxl_domain_suspend` to `fd` at its current offset (non-live; synchronous). On
    /// success the domain is left suspended (shut down with reason `suspend`), not destroyed.
    pub fn suspend_to_fd(&self, domid: u32, fd: RawFd) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; fd is kept open by the caller for the synchronous call.
        self.simple("libxl_domain_suspend", |c| unsafe {
            sys::libxl_domain_suspend(c, domid, fd, 0, ptr::null())
        })
    }

    /// `libxl_domain_suspend_only`: ask the guest to suspend, keep it in memory.
    pub fn suspend_only(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_suspend_only", |c| unsafe {
            sys::libxl_domain_suspend_only(c, domid, ptr::null())
        })
    }

    /// `libxl_domain_resume` with co-operative resume (`suspend_cancel = 1`): the guest's
    /// suspend hypercall returns "cancelled" and it runs on. Only for a suspended domain.
    pub fn resume_cancel(&self, domid: u32) -> Result<(), LibxlError> {
        // SAFETY: valid ctx; NULL ao_how = synchronous.
        self.simple("libxl_domain_resume", |c| unsafe {
            sys::libxl_domain_resume(c, domid, 1, ptr::null())
        })
    }

    /// `libxl_domain_info` of one domain.
    pub fn domain_info(&self, domid: u32) -> Result<DomInfo, LibxlError> {
        let mark = self.error_mark();
        let mut info = std::mem::MaybeUninit::<sys::libxl_dominfo>::uninit();
        // SAFETY: init before use (libxl.h:684).
        unsafe { sys::libxl_dominfo_init(info.as_mut_ptr()) };
        // SAFETY: valid ctx and initialised out struct.
        let rc = unsafe { sys::libxl_domain_info(self.ptr(), info.as_mut_ptr(), domid) };
        // SAFETY: initialised above (and filled on success).
        let out = DomInfo::from_raw(unsafe { &*info.as_ptr() });
        // SAFETY: disposed exactly once.
        unsafe { sys::libxl_dominfo_dispose(info.as_mut_ptr()) };
        if rc != 0 {
            return Err(self.error("libxl_domain_info", rc, mark));
        }
        Ok(out)
    }

    /// What `libxl_domain_info` says about `domid`'s use of the host (cpu time, memory):
    /// the statistics of [`crate::stats`].
    pub fn domain_usage(&self, domid: u32) -> Result<DomUsage, LibxlError> {
        let mark = self.error_mark();
        let mut info = std::mem::MaybeUninit::<sys::libxl_dominfo>::uninit();
        // SAFETY: init before use (libxl.h:684).
        unsafe { sys::libxl_dominfo_init(info.as_mut_ptr()) };
        // SAFETY: valid ctx and initialised out struct.
        let rc = unsafe { sys::libxl_domain_info(self.ptr(), info.as_mut_ptr(), domid) };
        // SAFETY: initialised above (and filled on success); only plain fields are read.
        let out = usage_from_raw(unsafe { &*info.as_ptr() });
        // SAFETY: disposed exactly once.
        unsafe { sys::libxl_dominfo_dispose(info.as_mut_ptr()) };
        if rc != 0 {
            return Err(self.error("libxl_domain_info", rc, mark));
        }
        Ok(out)
    }

    /// `libxl_list_domain` as usage records: every domain of the host in one call (the
    /// bulk statistics poll), keyed by uuid.
    pub fn list_usage(&self) -> Result<Vec<(uuid::Uuid, DomUsage)>, LibxlError> {
        let mark = self.error_mark();
        let mut n: c_int = 0;
        // SAFETY: valid ctx and out pointer; the list is freed below.
        let list = unsafe { sys::libxl_list_domain(self.ptr(), &mut n) };
        if list.is_null() {
            return Err(self.error("libxl_list_domain", sys::ERROR_FAIL, mark));
        }
        // SAFETY: libxl returned n initialised entries at list.
        let slice = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
        let out = slice
            .iter()
            .map(|i| (uuid::Uuid::from_bytes(i.uuid.uuid), usage_from_raw(i)))
            .collect();
        // SAFETY: list/n came from libxl_list_domain and are freed once, after the last read.
        unsafe { sys::libxl_dominfo_list_free(list, n) };
        Ok(out)
    }

    /// `libxl_list_vcpu`: each vCPU of `domid` with its cpu time.
    pub fn list_vcpus(&self, domid: u32) -> Result<Vec<VcpuUsage>, LibxlError> {
        let mark = self.error_mark();
        let (mut n, mut nr_cpus): (c_int, c_int) = (0, 0);
        // SAFETY: valid ctx and out pointers. The array (and each entry's cpumaps) is
        // malloc'ed by libxl and owned by us until libxl_vcpuinfo_list_free below.
        let list = unsafe { sys::libxl_list_vcpu(self.ptr(), domid, &mut n, &mut nr_cpus) };
        if list.is_null() {
            return Err(self.error("libxl_list_vcpu", sys::ERROR_FAIL, mark));
        }
        // SAFETY: libxl returned n initialised entries at list; only plain fields are read.
        let slice = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
        let out = slice
            .iter()
            .map(|v| VcpuUsage {
                vcpuid: v.vcpuid,
                online: v.online,
                vcpu_time_ns: v.vcpu_time,
            })
            .collect();
        // SAFETY: list/n came from libxl_list_vcpu; freed (entries disposed, array freed)
        // exactly once, after the last read.
        unsafe { sys::libxl_vcpuinfo_list_free(list, n) };
        Ok(out)
    }

    /// `libxl_get_memory_target`: `domid`'s balloon target in KiB.
    pub fn memory_target_kib(&self, domid: u32) -> Result<u64, LibxlError> {
        let mark = self.error_mark();
        let mut target: u64 = 0;
        // SAFETY: valid ctx and out pointer (a u64 under LIBXL_API_VERSION >= 0x040800).
        let rc = unsafe { sys::libxl_get_memory_target(self.ptr(), domid, &mut target) };
        if rc != 0 {
            return Err(self.error("libxl_get_memory_target", rc, mark));
        }
        Ok(target)
    }

    /// `libxl_console_get_tty` of `domid`'s PV console 0: the dom0 pty xenconsoled serves
    /// it on. `DOMAIN_NOTFOUND`-like errors while xenconsoled has not made it yet.
    pub fn console_tty(&self, domid: u32) -> Result<std::path::PathBuf, LibxlError> {
        use std::os::unix::ffi::OsStrExt;
        let mark = self.error_mark();
        let mut path: *mut c_char = ptr::null_mut();
        // SAFETY: valid ctx and out pointer; libxl sets *path only on success, to a
        // malloc'ed C string (libxl__strdup) that we own and free below.
        let rc = unsafe {
            sys::libxl_console_get_tty(self.ptr(), domid, 0, sys::LIBXL_CONSOLE_TYPE_PV, &mut path)
        };
        if rc != 0 || path.is_null() {
            // SAFETY: NULL (free does nothing) or malloc'ed by libxl and not used again.
            unsafe { libc::free(path.cast()) };
            let code = if rc != 0 { rc } else { sys::ERROR_FAIL };
            return Err(self.error("libxl_console_get_tty", code, mark));
        }
        // SAFETY: non-NULL, NUL-terminated string from libxl.
        let out = std::ffi::OsStr::from_bytes(unsafe { CStr::from_ptr(path) }.to_bytes()).into();
        // SAFETY: malloc'ed by libxl (strdup), not used again.
        unsafe { libc::free(path.cast()) };
        Ok(out)
    }

    /// `libxl_list_domain`: every domain on the host (dom0 included), with its name.
    pub fn list_domains(&self) -> Result<Vec<DomInfo>, LibxlError> {
        let mark = self.error_mark();
        let mut n: c_int = 0;
        // SAFETY: valid ctx and out pointer; the list is freed below.
        let list = unsafe { sys::libxl_list_domain(self.ptr(), &mut n) };
        if list.is_null() {
            return Err(self.error("libxl_list_domain", sys::ERROR_FAIL, mark));
        }
        // SAFETY: libxl returned n initialised entries at list.
        let slice = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
        let mut out: Vec<DomInfo> = slice.iter().map(DomInfo::from_raw).collect();
        // SAFETY: list/n came from libxl_list_domain and are freed once.
        unsafe { sys::libxl_dominfo_list_free(list, n) };
        for d in &mut out {
            d.name = self.domid_to_name(d.domid);
        }
        Ok(out)
    }

    /// `libxl_domid_to_name`.
    pub fn domid_to_name(&self, domid: u32) -> Option<String> {
        // SAFETY: valid ctx; the result is NULL or a malloc'ed string freed below.
        let p = unsafe { sys::libxl_domid_to_name(self.ptr(), domid) };
        if p.is_null() {
            return None;
        }
        // SAFETY: NUL-terminated string from libxl.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: malloc'ed by libxl, not used again.
        unsafe { libc::free(p.cast()) };
        Some(s)
    }

    /// Whether the host can run PVH guests (`libxl_get_physinfo`): PVH is an HVM container,
    /// so it needs the HVM capability and a paging mode (HAP or shadow). Under QEMU TCG Xen
    /// reports `cap_hvm` but neither paging mode, and libxl then refuses PVH guests.
    pub fn host_can_run_pvh(&self) -> Result<bool, LibxlError> {
        let mark = self.error_mark();
        let mut info = std::mem::MaybeUninit::<sys::libxl_physinfo>::uninit();
        // SAFETY: init before use.
        unsafe { sys::libxl_physinfo_init(info.as_mut_ptr()) };
        // SAFETY: valid ctx and initialised out struct.
        let rc = unsafe { sys::libxl_get_physinfo(self.ptr(), info.as_mut_ptr()) };
        // SAFETY: initialised (and filled on success).
        let (hvm, hap, shadow) = unsafe {
            let i = &*info.as_ptr();
            (i.cap_hvm, i.cap_hap, i.cap_shadow)
        };
        // SAFETY: disposed once.
        unsafe { sys::libxl_physinfo_dispose(info.as_mut_ptr()) };
        if rc != 0 {
            return Err(self.error("libxl_get_physinfo", rc, mark));
        }
        tracing::debug!(hvm, hap, shadow, "Xen host capabilities");
        Ok(hvm && (hap || shadow))
    }

    /// Start watching `domid` for shutdown and death (`libxl_evenable_domain_death`); its
    /// events carry `token` as `for_user`. Disabled when the watch is dropped.
    pub fn watch_death(&self, domid: u32, token: u64) -> Result<DeathWatch, LibxlError> {
        let mark = self.error_mark();
        let mut evg: *mut sys::libxl_evgen_domain_death = ptr::null_mut();
        // SAFETY: valid ctx and out pointer.
        let rc = unsafe { sys::libxl_evenable_domain_death(self.ptr(), domid, token, &mut evg) };
        if rc != 0 || evg.is_null() {
            return Err(self.error("libxl_evenable_domain_death", rc, mark));
        }
        Ok(DeathWatch {
            ctx: self.clone(),
            evg,
            domid,
            token,
        })
    }
}

fn take_errors(state: *mut LoggerState, since: u64) -> String {
    // SAFETY: the LoggerState outlives every Context clone (and is only freed after the ctx).
    let state = unsafe { &*state };
    let log = state.errors.lock().unwrap_or_else(|p| p.into_inner());
    log.entries
        .iter()
        .filter(|(n, _)| *n >= since)
        .map(|(_, m)| m.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

fn free_raw(
    ctx: *mut sys::libxl_ctx,
    logger: *mut sys::xentoollog_logger,
    logger_state: *mut LoggerState,
    hook_state: *mut HookState,
    event_hooks: *mut sys::libxl_event_hooks,
    childproc_hooks: *mut sys::libxl_childproc_hooks,
) {
    // SAFETY: called once, with no thread using ctx; order: ctx first, then what it borrows.
    unsafe {
        sys::libxl_ctx_free(ctx);
        sys::libxenlight_sys_logger_destroy(logger);
        drop(Box::from_raw(logger_state));
        drop(Box::from_raw(hook_state));
        drop(Box::from_raw(event_hooks));
        drop(Box::from_raw(childproc_hooks));
    }
}

fn spawn_sigchld_thread(
    ctx: CtxPtr,
) -> std::io::Result<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)> {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
    let handle = std::thread::Builder::new()
        .name("domkit-libxl-sigchld".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let mut sig = match signal(SignalKind::child()) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        got = sig.recv() => {
                            if got.is_none() { break; }
                            // SAFETY: ctx is valid until this thread is joined (Shared::drop
                            // joins it before libxl_ctx_free); not called from a signal
                            // handler (libxl_event.h:491-494).
                            unsafe { sys::libxl_childproc_sigchld_occurred(ctx.get()) };
                        }
                    }
                }
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((handle, stop_tx)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("SIGCHLD thread died")),
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: writing one byte from a local buffer to our own pipe.
        unsafe { libc::write(self.wake_w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        if let Some(t) = self
            .loop_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        if let Some((t, stop)) = self
            .sigchld
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = stop.send(());
            let _ = t.join();
        }
        free_raw(
            self.ctx.0,
            self.logger,
            self.logger_state,
            self.hook_state,
            self.event_hooks,
            self.childproc_hooks,
        );
    }
}

/// The libxl functions of one device type, for [`Context::device_call`].
struct DeviceCall<T> {
    name: &'static str,
    init: unsafe extern "C" fn(*mut T),
    from_json: unsafe extern "C" fn(*mut sys::libxl_ctx, *mut T, *const c_char) -> c_int,
    dispose: unsafe extern "C" fn(*mut T),
    call: unsafe extern "C" fn(
        *mut sys::libxl_ctx,
        u32,
        *mut T,
        *const sys::libxl_asyncop_how,
    ) -> c_int,
}

/// An owned `libxl_domain_config` (init on creation, dispose on drop).
struct DomainConfigBuf(Box<std::mem::MaybeUninit<sys::libxl_domain_config>>);

impl DomainConfigBuf {
    fn from_json(ctx: &Context, json: &str) -> Result<Self, LibxlError> {
        let mark = ctx.error_mark();
        let c = CString::new(json).map_err(|_| LibxlError {
            call: "libxl_domain_config_from_json",
            code: sys::ERROR_INVAL,
            detail: "the JSON config contains a NUL byte".into(),
        })?;
        let mut buf = DomainConfigBuf(Box::new(std::mem::MaybeUninit::uninit()));
        // SAFETY: init writes a valid empty config (libxl.h:684-691).
        unsafe { sys::libxl_domain_config_init(buf.0.as_mut_ptr()) };
        // SAFETY: valid ctx, initialised config, NUL-terminated JSON.
        let rc = unsafe {
            sys::libxl_domain_config_from_json(ctx.ptr(), buf.0.as_mut_ptr(), c.as_ptr())
        };
        if rc != 0 {
            return Err(ctx.error("libxl_domain_config_from_json", rc, mark));
        }
        Ok(buf)
    }

    fn as_mut_ptr(&mut self) -> *mut sys::libxl_domain_config {
        self.0.as_mut_ptr()
    }
}

impl Drop for DomainConfigBuf {
    fn drop(&mut self) {
        // SAFETY: initialised in from_json; dispose is idempotent and called once here.
        unsafe { sys::libxl_domain_config_dispose(self.0.as_mut_ptr()) };
    }
}

/// What `libxl_domain_info` says about one domain (plain data; serialisable so that states
/// recorded on a real Xen host can be replayed by the unit tests of [`crate::reattach`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomInfo {
    /// The domid.
    pub domid: u32,
    /// The domain's uuid (the Xen domain handle).
    pub uuid: uuid::Uuid,
    /// Its name (filled by [`Context::list_domains`]; `None` elsewhere).
    pub name: Option<String>,
    /// vCPUs paused.
    pub paused: bool,
    /// Shut down (not yet destroyed).
    pub shutdown: bool,
    /// Being destroyed.
    pub dying: bool,
    /// `LIBXL_SHUTDOWN_REASON_*` when `shutdown`, else -1.
    pub shutdown_reason: i32,
}

impl DomInfo {
    fn from_raw(i: &sys::libxl_dominfo) -> Self {
        DomInfo {
            domid: i.domid,
            uuid: uuid::Uuid::from_bytes(i.uuid.uuid),
            name: None,
            paused: i.paused,
            shutdown: i.shutdown,
            dying: i.dying,
            shutdown_reason: i.shutdown_reason,
        }
    }
}

/// The usage figures of one `libxl_dominfo` (plain fields only).
fn usage_from_raw(i: &sys::libxl_dominfo) -> DomUsage {
    DomUsage {
        domid: i.domid,
        cpu_time_ns: i.cpu_time,
        current_memkb: i.current_memkb,
        max_memkb: i.max_memkb,
        vcpu_online: i.vcpu_online,
    }
}

/// An enabled `libxl_evgen_domain_death` for one domid; disabled on drop.
pub struct DeathWatch {
    ctx: Context,
    evg: *mut sys::libxl_evgen_domain_death,
    domid: u32,
    token: u64,
}

// SAFETY: the evgen handle is only passed back to libxl (evdisable, once, in Drop), which is
// thread-safe; the ctx it belongs to is kept alive by the Context clone.
unsafe impl Send for DeathWatch {}
// SAFETY: &DeathWatch exposes only plain data (domid, token).
unsafe impl Sync for DeathWatch {}

impl DeathWatch {
    /// The watched domid.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// The `for_user` token its events carry.
    pub fn token(&self) -> u64 {
        self.token
    }
}

impl fmt::Debug for DeathWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeathWatch")
            .field("domid", &self.domid)
            .field("token", &self.token)
            .finish()
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        // SAFETY: evg came from libxl_evenable_domain_death on this ctx, which is still alive
        // (we hold a Context clone), and is disabled exactly once.
        unsafe { sys::libxl_evdisable_domain_death(self.ctx.ptr(), self.evg) };
    }
}
