//! Constants, hand-defined macros, API signatures and struct layouts.
//! No hypervisor needed.

use std::collections::BTreeMap;
use std::ffi::{c_int, CStr};
use std::mem::{align_of, size_of};

use libxenlight_sys as sys;

#[test]
fn shutdown_reasons() {
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_UNKNOWN, -1);
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_POWEROFF, 0);
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_REBOOT, 1);
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_SUSPEND, 2);
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_CRASH, 3);
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_WATCHDOG, 4);
    assert_eq!(sys::LIBXL_SHUTDOWN_REASON_SOFT_RESET, 5);
}

#[test]
fn event_types_and_misc_constants() {
    assert_eq!(sys::LIBXL_EVENT_TYPE_DOMAIN_SHUTDOWN, 1);
    assert_eq!(sys::LIBXL_EVENT_TYPE_DOMAIN_DEATH, 2);
    assert_eq!(sys::LIBXL_EVENT_TYPE_DISK_EJECT, 3);
    assert_eq!(sys::LIBXL_EVENT_TYPE_OPERATION_COMPLETE, 4);
    assert_eq!(sys::LIBXL_EVENT_TYPE_DOMAIN_CREATE_CONSOLE_AVAILABLE, 5);
    assert_eq!(sys::ERROR_FAIL, -3);
    assert_eq!(sys::ERROR_NOT_READY, -11);
    assert_eq!(sys::LIBXL_SUSPEND_LIVE, 2);
    assert_eq!(sys::LIBXL_VERSION, 0);
    assert_eq!(sys::libxl_sigchld_owner_libxl, 0);
    assert_eq!(sys::libxl_sigchld_owner_mainloop, 1);
    assert_eq!(sys::libxl_sigchld_owner_libxl_always_selective_reap, 3);
    assert_eq!(sys::XTL_NONE, 0);
    assert_eq!(sys::XTL_PROGRESS, 4);
    assert_eq!(sys::XTL_CRITICAL, 9);
}

/// The macros defined by hand in lib.rs equal what the C compiler computes.
#[test]
fn hand_defined_macros_match_c() {
    let mut n = 0usize;
    // SAFETY: `n` is a valid out pointer; the table is static.
    let table = unsafe { sys::libxenlight_sys_macros(&mut n) };
    // SAFETY: the shim returns a static array of `n` entries.
    let table = unsafe { std::slice::from_raw_parts(table, n) };
    let c: BTreeMap<String, u64> = table
        .iter()
        .map(|m| {
            (
                // SAFETY: names are static NUL-terminated strings.
                unsafe { CStr::from_ptr(m.name) }
                    .to_str()
                    .unwrap()
                    .to_owned(),
                m.value,
            )
        })
        .collect();
    let rust: BTreeMap<String, u64> = [
        ("LIBXL_API_VERSION", u64::from(sys::LIBXL_API_VERSION)),
        ("INVALID_DOMID", u64::from(sys::INVALID_DOMID)),
        ("RANDOM_DOMID", u64::from(sys::RANDOM_DOMID)),
        ("LIBXL_EVENTMASK_ALL", sys::LIBXL_EVENTMASK_ALL),
        ("LIBXL_MEMKB_DEFAULT", sys::LIBXL_MEMKB_DEFAULT),
        ("LIBXL_PCI_FUNC_ALL", u64::from(sys::LIBXL_PCI_FUNC_ALL)),
        (
            "LIBXL_MAX_GRANT_DEFAULT",
            u64::from(sys::LIBXL_MAX_GRANT_DEFAULT),
        ),
        (
            "LIBXL_CPUTOPOLOGY_INVALID_ENTRY",
            u64::from(sys::LIBXL_CPUTOPOLOGY_INVALID_ENTRY),
        ),
        (
            "LIBXL_PCITOPOLOGY_INVALID_ENTRY",
            u64::from(sys::LIBXL_PCITOPOLOGY_INVALID_ENTRY),
        ),
        (
            "LIBXL_NUMAINFO_INVALID_ENTRY",
            u64::from(sys::LIBXL_NUMAINFO_INVALID_ENTRY),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(c, rust);
    assert_eq!(sys::LIBXL_API_VERSION, 0x041400);
    assert_eq!(sys::INVALID_DOMID, 0xffff_ffff);
    assert_eq!(sys::RANDOM_DOMID, 0xffff_fffe);
}

#[test]
fn libxl_have_lists_valueless_and_conditional_defines() {
    for name in [
        "FN_USING_QMP_ASYNC",
        "SOFT_RESET",
        "AO_ABORT",
        "DOMAIN_CREATE_RESTORE_PARAMS",
        "DOMAIN_CREATE_RESTORE_SEND_BACK_FD",
        "SIGCHLD_OWNER_SELECTIVE_REAP",
        "SIGCHLD_SHARING",
        "DOMAIN_SUSPEND_ONLY",
        // `#define LIBXL_HAVE_CREATEINFO_DOMID` has no value: bindgen skips it.
        "CREATEINFO_DOMID",
        // Defined only for LIBXL_API_VERSION != 0x040200.
        "NONCONST_EVENT_OCCURS_EVENT_ARG",
    ] {
        assert!(sys::LIBXL_HAVE.contains(&name), "LIBXL_HAVE_{name} missing");
    }
    assert!(
        sys::LIBXL_HAVE.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    assert_eq!(sys::LIBXL_HAVE_SOFT_RESET, 1);
}

/// The signatures the driver relies on, as selected by LIBXL_API_VERSION
/// 0x041400 (ao_how everywhere). A different API version fails to compile.
#[test]
fn api_signatures() {
    use sys::{libxl_asyncop_how as Ao, libxl_asyncprogress_how as Aop, libxl_ctx as Ctx};
    type Cfg = sys::libxl_domain_config;
    let _: unsafe extern "C" fn(*mut *mut Ctx, c_int, u32, *mut sys::xentoollog_logger) -> c_int =
        sys::libxl_ctx_alloc;
    let _: unsafe extern "C" fn(*mut Ctx, *mut Cfg, *mut u32, *const Ao, *const Aop) -> c_int =
        sys::libxl_domain_create_new;
    let _: unsafe extern "C" fn(
        *mut Ctx,
        *mut Cfg,
        *mut u32,
        c_int,
        c_int,
        *const sys::libxl_domain_restore_params,
        *const Ao,
        *const Aop,
    ) -> c_int = sys::libxl_domain_create_restore;
    let _: unsafe extern "C" fn(*mut Ctx, *mut Cfg, u32, *const Ao, *const Aop) -> c_int =
        sys::libxl_domain_soft_reset;
    let _: unsafe extern "C" fn(*mut Ctx, u32, c_int, c_int, *const Ao) -> c_int =
        sys::libxl_domain_suspend;
    let ao_only: [unsafe extern "C" fn(*mut Ctx, u32, *const Ao) -> c_int; 6] = [
        sys::libxl_domain_shutdown,
        sys::libxl_domain_reboot,
        sys::libxl_domain_pause,
        sys::libxl_domain_unpause,
        sys::libxl_domain_destroy,
        sys::libxl_domain_suspend_only,
    ];
    assert_eq!(ao_only.len(), 6);
    let _: unsafe extern "C" fn(*mut Ctx, u32, sys::libxl_trigger, u32, *const Ao) -> c_int =
        sys::libxl_send_trigger;
    let _: unsafe extern "C" fn(
        *mut Ctx,
        u32,
        sys::libxl_ev_user,
        *mut *mut sys::libxl_evgen_domain_death,
    ) -> c_int = sys::libxl_evenable_domain_death;
    let _: unsafe extern "C" fn(
        *mut Ctx,
        *mut *mut sys::libxl_event,
        u64,
        Option<unsafe extern "C" fn(*const sys::libxl_event, *mut std::ffi::c_void) -> c_int>,
        *mut std::ffi::c_void,
    ) -> c_int = sys::libxl_event_check;
    let _: unsafe extern "C" fn(
        *mut Ctx,
        *mut libc::c_int,
        *mut libc::pollfd,
        *mut c_int,
        libc::timeval,
    ) -> c_int = sys::libxl_osevent_beforepoll;
    // Statistics and the console (driver-libxl's stats and observe modules): the memory
    // target is a u64 since LIBXL_API_VERSION 0x040800.
    let _: unsafe extern "C" fn(*mut Ctx, u32, *mut c_int, *mut c_int) -> *mut sys::libxl_vcpuinfo =
        sys::libxl_list_vcpu;
    let _: unsafe extern "C" fn(*mut sys::libxl_vcpuinfo, c_int) = sys::libxl_vcpuinfo_list_free;
    let _: unsafe extern "C" fn(*mut Ctx, u32, *mut u64) -> c_int = sys::libxl_get_memory_target;
    let _: unsafe extern "C" fn(
        *mut Ctx,
        u32,
        c_int,
        sys::libxl_console_type,
        *mut *mut std::os::raw::c_char,
    ) -> c_int = sys::libxl_console_get_tty;
    // event_occurs takes a non-const event (LIBXL_HAVE_NONCONST_EVENT_OCCURS_EVENT_ARG).
    let hooks = sys::libxl_event_hooks {
        event_occurs_mask: sys::LIBXL_EVENTMASK_ALL,
        event_occurs: None,
        disaster: None,
    };
    let _: Option<unsafe extern "C" fn(*mut std::ffi::c_void, *mut sys::libxl_event)> =
        hooks.event_occurs;
}

macro_rules! rust_layouts {
    ($($name:literal => $t:ty),* $(,)?) => {
        BTreeMap::from([$(($name.to_owned(), (size_of::<$t>(), align_of::<$t>()))),*])
    };
}

/// bindgen (libclang) and the C compiler that builds the shim (usually gcc)
/// agree on the layout of the structs the driver passes around.
#[test]
fn layouts_match_c_compiler() {
    let mut n = 0usize;
    // SAFETY: `n` is a valid out pointer; the table is static.
    let table = unsafe { sys::libxenlight_sys_layouts(&mut n) };
    // SAFETY: the shim returns a static array of `n` entries.
    let table = unsafe { std::slice::from_raw_parts(table, n) };
    let c: BTreeMap<String, (usize, usize)> = table
        .iter()
        .map(|l| {
            (
                // SAFETY: names are static NUL-terminated strings.
                unsafe { CStr::from_ptr(l.name) }
                    .to_str()
                    .unwrap()
                    .to_owned(),
                (l.size, l.align),
            )
        })
        .collect();
    let rust = rust_layouts! {
        "libxl_asyncop_how" => sys::libxl_asyncop_how,
        "libxl_asyncprogress_how" => sys::libxl_asyncprogress_how,
        "libxl_bitmap" => sys::libxl_bitmap,
        "libxl_childproc_hooks" => sys::libxl_childproc_hooks,
        "libxl_defbool" => sys::libxl_defbool,
        "libxl_device_disk" => sys::libxl_device_disk,
        "libxl_device_nic" => sys::libxl_device_nic,
        "libxl_domain_build_info" => sys::libxl_domain_build_info,
        "libxl_domain_config" => sys::libxl_domain_config,
        "libxl_domain_create_info" => sys::libxl_domain_create_info,
        "libxl_domain_restore_params" => sys::libxl_domain_restore_params,
        "libxl_dominfo" => sys::libxl_dominfo,
        "libxl_event" => sys::libxl_event,
        "libxl_event_hooks" => sys::libxl_event_hooks,
        "libxl_osevent_hooks" => sys::libxl_osevent_hooks,
        "libxl_physinfo" => sys::libxl_physinfo,
        "libxl_uuid" => sys::libxl_uuid,
        "libxl_vcpuinfo" => sys::libxl_vcpuinfo,
        "libxl_version_info" => sys::libxl_version_info,
        "libxl_vminfo" => sys::libxl_vminfo,
        "xentoollog_logger" => sys::xentoollog_logger,
        "struct libxenlight_sys_layout" => sys::libxenlight_sys_layout,
        "struct libxenlight_sys_macro" => sys::libxenlight_sys_macro,
    };
    assert_eq!(c, rust);
}
