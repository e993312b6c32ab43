//! libxl functions that work on plain memory, without a ctx and without a
//! hypervisor: IDL init/dispose, uuids, defbools, enum strings, bitmaps.

mod common;

use std::mem::MaybeUninit;
use std::ptr;

use common::c_str;
use libxenlight_sys as sys;

/// An initialised `libxl_domain_config`, disposed on drop.
struct DomainConfig(sys::libxl_domain_config);

impl DomainConfig {
    fn new() -> DomainConfig {
        let mut cfg = MaybeUninit::<sys::libxl_domain_config>::uninit();
        // SAFETY: libxl_domain_config_init initialises every field.
        unsafe {
            sys::libxl_domain_config_init(cfg.as_mut_ptr());
            DomainConfig(cfg.assume_init())
        }
    }
}

impl Drop for DomainConfig {
    fn drop(&mut self) {
        // SAFETY: initialised by libxl_domain_config_init, disposed once.
        unsafe { sys::libxl_domain_config_dispose(&mut self.0) };
    }
}

#[test]
fn domain_config_init_and_dispose() {
    let mut cfg = DomainConfig::new();
    let c = &mut cfg.0;
    // libxl's defaults, not all-zero memory.
    assert_eq!(c.c_info.type_, sys::LIBXL_DOMAIN_TYPE_INVALID);
    assert_eq!(c.b_info.type_, sys::LIBXL_DOMAIN_TYPE_INVALID);
    assert_eq!(c.b_info.max_memkb, sys::LIBXL_MEMKB_DEFAULT);
    assert_eq!(c.b_info.target_memkb, sys::LIBXL_MEMKB_DEFAULT);
    assert_eq!(c.c_info.domid, 0); // no init_val in the IDL
    assert_eq!(c.num_disks, 0);
    assert!(c.disks.is_null());
    assert!(c.c_info.name.is_null());

    c.c_info.type_ = sys::LIBXL_DOMAIN_TYPE_PVH;
    // SAFETY: b_info was initialised by the config init, and its type union
    // not yet (init_type requirement).
    unsafe { sys::libxl_domain_build_info_init_type(&mut c.b_info, sys::LIBXL_DOMAIN_TYPE_PVH) };
    assert_eq!(c.b_info.type_, sys::LIBXL_DOMAIN_TYPE_PVH);

    // Strings inside IDL structs are freed by dispose: they must be malloc'ed.
    // SAFETY: NUL-terminated literals; strdup returns malloc'ed copies.
    unsafe {
        c.c_info.name = libc::strdup(cs!("domkit-test"));
        c.b_info.kernel = libc::strdup(cs!("/boot/vmlinuz"));
    }
    assert_eq!(c_str(c.c_info.name).as_deref(), Some("domkit-test"));
    // Drop disposes (frees the two strings).
}

#[test]
fn dispose_then_init_again() {
    let mut cfg = DomainConfig::new();
    // SAFETY: "init" and "dispose" are idempotent (libxl.h:691); after a
    // dispose the struct may be initialised again and disposed by Drop.
    unsafe {
        sys::libxl_domain_config_dispose(&mut cfg.0);
        sys::libxl_domain_config_init(&mut cfg.0);
    }
    assert_eq!(cfg.0.c_info.type_, sys::LIBXL_DOMAIN_TYPE_INVALID);
}

#[test]
fn other_idl_types_init_dispose() {
    let mut info = MaybeUninit::<sys::libxl_dominfo>::uninit();
    let mut params = MaybeUninit::<sys::libxl_domain_restore_params>::uninit();
    let mut ev = MaybeUninit::<sys::libxl_event>::uninit();
    // SAFETY: each init fully initialises its struct; each is disposed once.
    unsafe {
        sys::libxl_dominfo_init(info.as_mut_ptr());
        sys::libxl_domain_restore_params_init(params.as_mut_ptr());
        sys::libxl_event_init(ev.as_mut_ptr());
        assert_eq!((*info.as_ptr()).domid, 0);
        assert!((*info.as_ptr()).ssid_label.is_null());
        assert_eq!((*ev.as_ptr()).type_, 0);
        sys::libxl_event_init_type(ev.as_mut_ptr(), sys::LIBXL_EVENT_TYPE_DOMAIN_SHUTDOWN);
        assert_eq!((*ev.as_ptr()).type_, sys::LIBXL_EVENT_TYPE_DOMAIN_SHUTDOWN);
        // Union members are ManuallyDrop<T>: read them through a reference.
        let ev_ref: &sys::libxl_event = &*ev.as_ptr();
        assert_eq!(ev_ref.u.domain_shutdown.shutdown_reason, 0);
        sys::libxl_dominfo_dispose(info.as_mut_ptr());
        sys::libxl_domain_restore_params_dispose(params.as_mut_ptr());
        sys::libxl_event_dispose(ev.as_mut_ptr());
    }
}

#[test]
fn uuid_helpers() {
    let mut a = sys::libxl_uuid { uuid: [0; 16] };
    let mut b = sys::libxl_uuid { uuid: [0; 16] };
    // SAFETY: valid libxl_uuid pointers and a NUL-terminated string; the ctx
    // argument of libxl_uuid_copy is optional (LIBXL_HAVE_UUID_COPY_CTX_PARAM).
    unsafe {
        assert_ne!(sys::libxl_uuid_is_nil(&a), 0);
        assert_eq!(
            sys::libxl_uuid_from_string(&mut a, cs!("5f3c1d4e-0b7a-4c1e-9d2f-0a1b2c3d4e5f")),
            0
        );
        assert_eq!(a.uuid[..4], [0x5f, 0x3c, 0x1d, 0x4e]); // big-endian octets
        assert_eq!(*sys::libxl_uuid_bytearray_const(&a), 0x5f);
        assert_eq!(sys::libxl_uuid_is_nil(&a), 0);
        assert_ne!(sys::libxl_uuid_compare(&a, &b), 0);
        sys::libxl_uuid_copy(ptr::null_mut(), &mut b, &a);
        assert_eq!(sys::libxl_uuid_compare(&a, &b), 0);
        assert_ne!(sys::libxl_uuid_from_string(&mut b, cs!("not-a-uuid")), 0);
        sys::libxl_uuid_clear(&mut a);
        assert_ne!(sys::libxl_uuid_is_nil(&a), 0);
        sys::libxl_uuid_generate(&mut a);
        assert_eq!(sys::libxl_uuid_is_nil(&a), 0);
    }
    assert_eq!(sys::LIBXL_UUID_FMTLEN, 36);
}

#[test]
fn defbool_helpers() {
    let mut db = sys::libxl_defbool { val: 0 };
    // SAFETY: valid libxl_defbool pointers; val() only after set.
    unsafe {
        assert!(sys::libxl_defbool_is_default(db));
        assert_eq!(
            c_str(sys::libxl_defbool_to_string(db)).as_deref(),
            Some("<default>")
        );
        sys::libxl_defbool_setdefault(&mut db, true);
        assert!(sys::libxl_defbool_val(db));
        sys::libxl_defbool_setdefault(&mut db, false); // already set: no effect
        assert!(sys::libxl_defbool_val(db));
        sys::libxl_defbool_set(&mut db, false);
        assert!(!sys::libxl_defbool_val(db));
        sys::libxl_defbool_unset(&mut db);
        assert!(sys::libxl_defbool_is_default(db));
    }
}

#[test]
fn enum_strings() {
    // SAFETY: the *_to_string functions return static strings (or NULL);
    // from_string takes a NUL-terminated string and a valid out pointer.
    unsafe {
        assert_eq!(
            c_str(sys::libxl_shutdown_reason_to_string(
                sys::LIBXL_SHUTDOWN_REASON_SUSPEND
            ))
            .as_deref(),
            Some("suspend")
        );
        assert_eq!(
            c_str(sys::libxl_event_type_to_string(
                sys::LIBXL_EVENT_TYPE_DOMAIN_DEATH
            ))
            .as_deref(),
            Some("domain_death")
        );
        assert_eq!(
            c_str(sys::libxl_error_to_string(sys::ERROR_FAIL)).as_deref(),
            Some("fail")
        );
        let mut t: sys::libxl_domain_type = 0;
        assert_eq!(sys::libxl_domain_type_from_string(cs!("pvh"), &mut t), 0);
        assert_eq!(t, sys::LIBXL_DOMAIN_TYPE_PVH);
        assert_ne!(
            sys::libxl_domain_type_from_string(cs!("nonsense"), &mut t),
            0
        );
        let mut trig: sys::libxl_trigger = 0;
        assert_eq!(sys::libxl_trigger_from_string(cs!("power"), &mut trig), 0);
        assert_eq!(trig, sys::LIBXL_TRIGGER_POWER);
    }
}

#[test]
fn bitmap_and_shim_inline_helpers() {
    let mut a = MaybeUninit::<sys::libxl_bitmap>::uninit();
    let mut b = MaybeUninit::<sys::libxl_bitmap>::uninit();
    // SAFETY: init then give each bitmap a 4-byte malloc'ed map (what
    // libxl_bitmap_alloc would do, without needing a ctx); dispose frees it.
    unsafe {
        sys::libxl_bitmap_init(a.as_mut_ptr());
        sys::libxl_bitmap_init(b.as_mut_ptr());
        let (a, b) = (&mut *a.as_mut_ptr(), &mut *b.as_mut_ptr());
        for m in [&mut *a, &mut *b] {
            m.map = libc::calloc(4, 1).cast();
            m.size = 4;
        }
        assert_ne!(sys::libxl_bitmap_is_empty(a), 0);
        sys::libxenlight_sys_bitmap_set_any(a);
        assert_ne!(sys::libxl_bitmap_is_full(a), 0);
        assert_eq!(sys::libxl_bitmap_count_set(a), 32);
        assert_eq!(sys::libxenlight_sys_bitmap_equal(a, b, 0), 0);
        sys::libxenlight_sys_bitmap_set_none(a);
        assert_ne!(sys::libxenlight_sys_bitmap_equal(a, b, 0), 0);
        sys::libxl_bitmap_set(a, 5);
        assert_ne!(sys::libxl_bitmap_test(a, 5), 0);
        assert_eq!(sys::libxenlight_sys_bitmap_equal(a, b, 0), 0);
        assert_ne!(sys::libxenlight_sys_bitmap_equal(a, b, 5), 0); // first 5 bits only
        sys::libxl_bitmap_dispose(a);
        sys::libxl_bitmap_dispose(b);
    }
}
