/*
 * libxenlight-sys C shim: the few things bindgen cannot bind from libxl's
 * headers, plus a xentoollog logger that forwards messages to Rust.
 *
 * This header is also the bindgen input: it includes every libxl header the
 * crate binds, so the Rust bindings and the compiled shim always see the same
 * declarations under the same LIBXL_API_VERSION.
 *
 * Doc comments that start with "@rustdoc" are Markdown; build.rs strips the
 * marker and bindgen copies them into the rustdoc of the generated items.
 * All other (libxl) comments are copied verbatim inside a text block.
 */
#ifndef LIBXENLIGHT_SYS_SHIM_H
#define LIBXENLIGHT_SYS_SHIM_H

/* build.rs passes -DLIBXL_API_VERSION=... to both bindgen and the C compiler.
 * Refuse to build without it: an undefined LIBXL_API_VERSION means "the
 * latest API", which changes between Xen releases. */
#ifndef LIBXL_API_VERSION
#error "libxenlight-sys: LIBXL_API_VERSION must be defined (build.rs sets it)"
#endif

#include <stddef.h>
#include <stdint.h>
#include <xentoollog.h>
#include <libxl.h>
#include <libxl_event.h>
#include <libxl_utils.h>
#include <libxl_uuid.h>

/*======================================================================*/
/* xentoollog logger forwarding to Rust                                  */

/**
 * @rustdoc
 * Callback receiving one formatted xentoollog message (see
 * [`libxenlight_sys_logger_new`]).
 *
 * Arguments: the `user` pointer given at creation, the message `level`
 * (`XTL_DEBUG` ..= `XTL_CRITICAL`, or `XTL_PROGRESS` for progress reports),
 * `errnoval` (an `errno` value the message refers to, or `-1`), `context`
 * (the emitting library, e.g. `"libxl"`, `"xc"`, `"xencall"`; may be NULL)
 * and `message` (NUL-terminated, without trailing newline; never NULL).
 * Both strings are only valid for the duration of the call.
 *
 * It may run on any thread that calls into libxl, concurrently with itself,
 * and with libxl's internal locks held: it must be thread-safe, must not
 * block for long, must not call back into libxl and must not unwind (a Rust
 * `extern "C"` function aborts the process if it panics).
 */
typedef void (*libxenlight_sys_log_fn)(void *user,
                                       xentoollog_level level,
                                       int errnoval,
                                       const char *context,
                                       const char *message);

/**
 * @rustdoc
 * Creates a xentoollog logger whose messages are formatted (`vsnprintf`) and
 * passed to `callback` together with `user`.
 *
 * The returned pointer is a `xentoollog_logger *` that can be given to
 * [`libxl_ctx_alloc`] (or any other Xen library taking a logger). Messages
 * whose level is below `min_level` are dropped before formatting; progress
 * reports (`xtl_progress`) are forwarded as `XTL_PROGRESS` messages such as
 * `"<doing_what>: 42%"`, only when the percentage changes.
 *
 * In a process forked by libxl that has not yet called `exec` (libxl forks
 * helpers such as the device model spawner and may log there before
 * `exec`/`_exit`), the callback is NOT called: only async-signal-safe code
 * may run there, so the message is written to stderr with `write(2)`.
 *
 * Returns NULL (with `errno` set) if `callback` is NULL or on allocation
 * failure.
 *
 * # Safety
 *
 * `user` must stay valid, and usable from any thread, until the logger is
 * destroyed. The logger must outlive every `libxl_ctx` (and other user) it
 * was given to: destroy it only after [`libxl_ctx_free`].
 */
xentoollog_logger *libxenlight_sys_logger_new(libxenlight_sys_log_fn callback,
                                              void *user,
                                              xentoollog_level min_level);

/**
 * @rustdoc
 * Changes the minimum level of a logger made by
 * [`libxenlight_sys_logger_new`]. Safe to call concurrently with logging.
 *
 * # Safety
 *
 * `logger` must come from [`libxenlight_sys_logger_new`] and not be destroyed.
 */
void libxenlight_sys_logger_set_min_level(xentoollog_logger *logger,
                                          xentoollog_level min_level);

/**
 * @rustdoc
 * Destroys a logger made by [`libxenlight_sys_logger_new`] (NULL is a no-op).
 * Equivalent to [`xtl_logger_destroy`]. The callback is not called again
 * after this returns.
 *
 * # Safety
 *
 * `logger` must come from [`libxenlight_sys_logger_new`], must not be in use
 * by any live `libxl_ctx` (free the ctx first), and must not be used again.
 */
void libxenlight_sys_logger_destroy(xentoollog_logger *logger);

/**
 * @rustdoc
 * Logs the preformatted string `message` through any xentoollog logger: it is
 * `xtl_log(logger, level, errnoval, context, "%s", message)`, so `message`
 * is never interpreted as a format string (calling the variadic `xtl_log`
 * from Rust with a user string as format would be unsound).
 *
 * # Safety
 *
 * `logger` must be a live logger; `context` must be NULL or a NUL-terminated
 * string; `message` must be a NUL-terminated string.
 */
void libxenlight_sys_log(xentoollog_logger *logger, xentoollog_level level,
                         int errnoval, const char *context,
                         const char *message);

/*======================================================================*/
/* static inline functions of libxl_utils.h                              */

/**
 * @rustdoc
 * `libxl_bitmap_set_any` (a `static inline` in `libxl_utils.h`): sets every
 * bit of the bitmap.
 *
 * # Safety
 *
 * `bitmap` must be an initialised (e.g. by [`libxl_bitmap_alloc`]) bitmap.
 */
void libxenlight_sys_bitmap_set_any(libxl_bitmap *bitmap);

/**
 * @rustdoc
 * `libxl_bitmap_set_none` (a `static inline` in `libxl_utils.h`): clears
 * every bit of the bitmap.
 *
 * # Safety
 *
 * `bitmap` must be an initialised (e.g. by [`libxl_bitmap_alloc`]) bitmap.
 */
void libxenlight_sys_bitmap_set_none(libxl_bitmap *bitmap);

/**
 * @rustdoc
 * `libxl_bitmap_equal` (a `static inline` in `libxl_utils.h`): compares the
 * first `nr_bits` bits (all bits of the larger map if `nr_bits` is 0; bits
 * past the end of a map count as 0). Returns 1 if equal, 0 otherwise.
 *
 * # Safety
 *
 * Both bitmaps must be initialised.
 */
int libxenlight_sys_bitmap_equal(const libxl_bitmap *a, const libxl_bitmap *b,
                                 int nr_bits);

/*======================================================================*/
/* Macros bindgen cannot evaluate, as compiled by the C compiler         */

/**
 * @rustdoc
 * One integer macro as the C compiler evaluates it (see
 * [`libxenlight_sys_macros`]).
 */
struct libxenlight_sys_macro {
    /** @rustdoc Macro name, e.g. `"INVALID_DOMID"`. */
    const char *name;
    /** @rustdoc Its value, converted to the type it is used with
     * (`uint32_t` for domids, `uint64_t` for memkb and event masks). */
    uint64_t value;
};

/**
 * @rustdoc
 * Table of the integer macros that bindgen cannot evaluate correctly
 * (`INVALID_DOMID` is `~0`, `LIBXL_MEMKB_DEFAULT` is `~0ULL`,
 * `LIBXL_EVENTMASK_ALL` is `~(unsigned long)0`, ...) and of
 * `LIBXL_API_VERSION`, as compiled into the shim. The crate defines these
 * constants by hand ([`INVALID_DOMID`](crate::INVALID_DOMID), ...) and a test
 * checks them against this table. Stores the number of entries in `*n` and
 * returns a static array.
 *
 * # Safety
 *
 * `n` must be a valid pointer.
 */
const struct libxenlight_sys_macro *libxenlight_sys_macros(size_t *n);

/**
 * @rustdoc
 * Size and alignment of one C type as the C compiler used for the shim
 * (usually gcc, while bindgen uses libclang) lays it out.
 */
struct libxenlight_sys_layout {
    /** @rustdoc C type name, e.g. `"libxl_domain_config"`. */
    const char *name;
    /** @rustdoc `sizeof` the type. */
    size_t size;
    /** @rustdoc `_Alignof` the type. */
    size_t align;
};

/**
 * @rustdoc
 * Table of C layouts of the structs the driver passes by value or embeds
 * (`libxl_domain_config`, `libxl_dominfo`, `libxl_event`, the `*_how` and
 * `*_hooks` structs, ...), so tests can compare them with the bindgen
 * layouts. Stores the number of entries in `*n` and returns a static array.
 *
 * # Safety
 *
 * `n` must be a valid pointer.
 */
const struct libxenlight_sys_layout *libxenlight_sys_layouts(size_t *n);

#endif /* LIBXENLIGHT_SYS_SHIM_H */
