//! Helpers shared by the integration tests: a logger that records every
//! message it receives from the shim.

#![allow(dead_code)] // each test crate uses a different subset

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use libxenlight_sys as sys;

/// One message as delivered to the Rust callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub level: sys::xentoollog_level,
    pub errnoval: i32,
    pub context: Option<String>,
    pub message: String,
}

/// State behind the logger's `user` pointer.
pub struct Collector {
    /// Process that owns the collector: the callback exits with status 42
    /// if it is ever called in another process (a forked child).
    owner_pid: u32,
    records: Mutex<Vec<Record>>,
}

/// The `libxenlight_sys_log_fn` under test.
pub extern "C" fn collect(
    user: *mut c_void,
    level: sys::xentoollog_level,
    errnoval: c_int,
    context: *const c_char,
    message: *const c_char,
) {
    // SAFETY: `user` is the `Collector` boxed in `Logger`, which destroys the
    // logger (so no more calls) before dropping the box.
    let collector = unsafe { &*(user as *const Collector) };
    if std::process::id() != collector.owner_pid {
        // SAFETY: _exit is async-signal-safe; we are in a forked child.
        unsafe { libc::_exit(42) };
    }
    let context = if context.is_null() {
        None
    } else {
        // SAFETY: the shim passes NUL-terminated strings valid for the call.
        Some(
            unsafe { CStr::from_ptr(context) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    // SAFETY: as above; `message` is never NULL.
    let message = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    let record = Record {
        level,
        errnoval,
        context,
        message,
    };
    // Never panic across the FFI boundary: ignore poisoning.
    collector
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(record);
}

/// Owns a shim logger and the collector it writes to.
pub struct Logger {
    pub ptr: *mut sys::xentoollog_logger,
    collector: Box<Collector>,
}

impl Logger {
    pub fn new(min_level: sys::xentoollog_level) -> Logger {
        let collector = Box::new(Collector {
            owner_pid: std::process::id(),
            records: Mutex::new(Vec::new()),
        });
        let user = &*collector as *const Collector as *mut c_void;
        // SAFETY: `user` outlives the logger (see Drop), and `collect` is
        // thread-safe (Mutex) and does not unwind.
        let ptr = unsafe { sys::libxenlight_sys_logger_new(Some(collect), user, min_level) };
        assert!(!ptr.is_null(), "libxenlight_sys_logger_new failed");
        Logger { ptr, collector }
    }

    pub fn records(&self) -> Vec<Record> {
        self.collector.records.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.collector.records.lock().unwrap().clear();
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from libxenlight_sys_logger_new, and every ctx
        // given this logger has been freed by the test before it drops it.
        unsafe { sys::libxenlight_sys_logger_destroy(self.ptr) };
    }
}

/// C string from a NUL-terminated libxl string (NULL -> None).
pub fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: libxl returns NUL-terminated strings.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// `cs!("text")`: a `*const c_char` to a static NUL-terminated string
/// (`c"..."` literals need Rust 1.77; the workspace MSRV is 1.75).
#[macro_export]
macro_rules! cs {
    ($s:expr) => {
        concat!($s, "\0").as_ptr() as *const ::std::ffi::c_char
    };
}
