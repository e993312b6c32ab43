//! The shim's xentoollog logger delivers messages to a Rust callback.
//! No hypervisor needed.

mod common;

use std::ffi::{c_int, CString};
use std::ptr;

use common::{Logger, Record};
use libxenlight_sys as sys;

fn record(
    level: sys::xentoollog_level,
    errnoval: i32,
    context: Option<&str>,
    message: &str,
) -> Record {
    Record {
        level,
        errnoval,
        context: context.map(str::to_owned),
        message: message.to_owned(),
    }
}

#[test]
fn message_reaches_rust_callback() {
    let lg = Logger::new(sys::XTL_DEBUG);
    // SAFETY: live logger, NUL-terminated strings.
    unsafe {
        sys::libxenlight_sys_log(lg.ptr, sys::XTL_ERROR, 5, cs!("domkit"), cs!("hello %s %d"))
    };
    // The message is passed through "%s": never interpreted as a format.
    assert_eq!(
        lg.records(),
        vec![record(sys::XTL_ERROR, 5, Some("domkit"), "hello %s %d")]
    );
}

#[test]
fn printf_formatting_via_xtl_log() {
    let lg = Logger::new(sys::XTL_DEBUG);
    // SAFETY: live logger; the variadic arguments match the format string.
    unsafe {
        sys::xtl_log(
            lg.ptr,
            sys::XTL_INFO,
            -1,
            cs!("libxl"),
            cs!("%s=%d (%05.1f)"),
            cs!("answer"),
            42 as c_int,
            3.5f64,
        )
    };
    assert_eq!(
        lg.records(),
        vec![record(
            sys::XTL_INFO,
            -1,
            Some("libxl"),
            "answer=42 (003.5)"
        )]
    );
}

#[test]
fn null_context_and_long_message() {
    let lg = Logger::new(sys::XTL_DEBUG);
    // Longer than the shim's 512-byte stack buffer: takes the malloc path.
    let long: String = (0..3000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let c_long = CString::new(long.clone()).unwrap();
    // SAFETY: live logger; NULL context is allowed; NUL-terminated message.
    unsafe { sys::libxenlight_sys_log(lg.ptr, sys::XTL_WARN, -1, ptr::null(), c_long.as_ptr()) };
    assert_eq!(lg.records(), vec![record(sys::XTL_WARN, -1, None, &long)]);
}

#[test]
fn min_level_filters_and_can_change() {
    let lg = Logger::new(sys::XTL_INFO);
    let log = |level| {
        // SAFETY: live logger, NUL-terminated strings.
        unsafe { sys::libxenlight_sys_log(lg.ptr, level, -1, cs!("t"), cs!("m")) }
    };
    log(sys::XTL_DEBUG);
    log(sys::XTL_DETAIL);
    log(sys::XTL_INFO);
    log(sys::XTL_CRITICAL);
    let levels: Vec<_> = lg.records().iter().map(|r| r.level).collect();
    assert_eq!(levels, vec![sys::XTL_INFO, sys::XTL_CRITICAL]);

    lg.clear();
    // SAFETY: live logger from libxenlight_sys_logger_new.
    unsafe { sys::libxenlight_sys_logger_set_min_level(lg.ptr, sys::XTL_DEBUG) };
    log(sys::XTL_DEBUG);
    assert_eq!(lg.records().len(), 1);
}

#[test]
fn progress_reports_only_changes() {
    let lg = Logger::new(sys::XTL_DEBUG);
    for (done, total) in [(0, 200), (100, 200), (100, 200), (101, 200), (200, 200)] {
        // SAFETY: live logger, NUL-terminated strings, total != 0.
        unsafe { sys::xtl_progress(lg.ptr, cs!("xc"), cs!("saving memory"), done, total) };
    }
    let msgs: Vec<_> = lg
        .records()
        .into_iter()
        .map(|r| (r.level, r.context, r.message))
        .collect();
    let p = |m: &str| (sys::XTL_PROGRESS, Some("xc".to_owned()), m.to_owned());
    assert_eq!(
        msgs,
        vec![
            p("saving memory: 0%"),
            p("saving memory: 50%"),
            p("saving memory: 100%")
        ]
    );
}

#[test]
fn concurrent_logging_from_many_threads() {
    let lg = Logger::new(sys::XTL_DEBUG);
    let ptr = lg.ptr as usize; // raw pointers are !Send; the logger is thread-safe
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in 0..500 {
                    let msg = CString::new(format!("thread {t} message {i}")).unwrap();
                    // SAFETY: the logger outlives the scope; the shim logger
                    // and `collect` are thread-safe.
                    unsafe {
                        sys::libxenlight_sys_log(
                            ptr as *mut _,
                            sys::XTL_INFO,
                            -1,
                            cs!("t"),
                            msg.as_ptr(),
                        )
                    };
                }
            });
        }
    });
    let records = lg.records();
    assert_eq!(records.len(), 2000);
    assert!(records.iter().any(|r| r.message == "thread 3 message 499"));
}

#[test]
fn null_callback_is_rejected_and_null_destroy_is_noop() {
    // SAFETY: a NULL callback is documented to fail with EINVAL.
    let lg = unsafe { sys::libxenlight_sys_logger_new(None, ptr::null_mut(), sys::XTL_DEBUG) };
    assert!(lg.is_null());
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EINVAL)
    );
    // SAFETY: NULL is documented as a no-op.
    unsafe { sys::libxenlight_sys_logger_destroy(ptr::null_mut()) };
}

#[test]
fn forked_child_writes_stderr_instead_of_calling_rust() {
    let lg = Logger::new(sys::XTL_DEBUG);
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only calls async-signal-safe functions (dup2, the
    // shim's foreign-process path: vsnprintf into a stack buffer, getpid,
    // write) and then _exit; it never returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: see above; `collect` would _exit(42) if called here.
        unsafe {
            libc::dup2(fds[1], 2);
            sys::libxenlight_sys_log(
                lg.ptr,
                sys::XTL_ERROR,
                -1,
                cs!("child"),
                cs!("from the child"),
            );
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, so read() sees EOF.
    unsafe { libc::close(fds[1]) };
    let mut status = 0;
    // SAFETY: `pid` is our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the Rust callback ran in the forked child"
    );
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: we own fds[0].
    unsafe { libc::close(fds[0]) };
    assert!(n > 0);
    assert_eq!(
        std::str::from_utf8(&buf[..n as usize]).unwrap(),
        "child: error: from the child\n"
    );
    assert!(lg.records().is_empty());
}

#[test]
fn stdiostream_logger_is_bound_too() {
    // The plain xentoollog stderr logger is available as a fallback.
    // SAFETY: `stderr` is the C library's stream; level and flags are valid.
    let lg = unsafe {
        extern "C" {
            static mut stderr: *mut libc::FILE;
        }
        sys::xtl_createlogger_stdiostream(stderr, sys::XTL_ERROR, 0)
    };
    assert!(!lg.is_null());
    // SAFETY: the stdiostream logger begins with its xentoollog_logger vtable.
    unsafe { sys::xtl_logger_destroy(lg.cast()) };
}
