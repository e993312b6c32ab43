/*
 * libxenlight-sys C shim. See shim.h for the contract of every function.
 */
#include "shim.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/*======================================================================*/
/* xentoollog logger forwarding to Rust                                  */

/* Messages up to this size are formatted on the stack; longer ones are
 * formatted again into a malloc'ed buffer (or truncated if that fails). */
#define SHIM_STACK_MSG 512

struct shim_logger {
    xentoollog_logger vtable; /* must be first: we hand out &vtable */
    libxenlight_sys_log_fn callback;
    void *user;
    atomic_int min_level;
    atomic_int last_percent;
    pid_t owner_pid; /* process that created the logger */
};

static struct shim_logger *shim_logger_of(xentoollog_logger *logger)
{
    /* vtable is the first member, so the pointers are interconvertible. */
    return (struct shim_logger *)logger;
}

static int shim_level_enabled(struct shim_logger *lg, xentoollog_level level)
{
    return (int)level >= atomic_load_explicit(&lg->min_level,
                                              memory_order_relaxed);
}

/* Forked-but-not-exec'd child of a (possibly multithreaded) process: only
 * async-signal-safe functions may run, so never call into Rust (tracing
 * takes locks that another thread may have held at fork time). Write the
 * message to stderr with a single write(2) instead. */
static int shim_in_foreign_process(struct shim_logger *lg)
{
    return getpid() != lg->owner_pid;
}

static void shim_write_stderr(xentoollog_level level, const char *context,
                              const char *msg)
{
    char line[SHIM_STACK_MSG + 64];
    int n = snprintf(line, sizeof(line), "%s: %s: %s\n",
                     context ? context : "xtl", xtl_level_to_string(level),
                     msg);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(line))
        n = sizeof(line) - 1;
    ssize_t r = write(STDERR_FILENO, line, (size_t)n);
    (void)r;
}

static void shim_vmessage(xentoollog_logger *logger, xentoollog_level level,
                          int errnoval, const char *context,
                          const char *format, va_list al)
{
    struct shim_logger *lg = shim_logger_of(logger);
    char stackbuf[SHIM_STACK_MSG];
    char *heap = NULL;
    const char *msg = stackbuf;
    int saved_errno = errno;
    va_list copy;
    int n;

    if (!shim_level_enabled(lg, level))
        return;

    va_copy(copy, al);
    n = vsnprintf(stackbuf, sizeof(stackbuf), format, copy);
    va_end(copy);

    if (shim_in_foreign_process(lg)) {
        shim_write_stderr(level, context,
                          n < 0 ? "(unformattable message)" : stackbuf);
        errno = saved_errno;
        return;
    }

    if (n < 0) {
        msg = "(libxenlight-sys: vsnprintf failed to format the message)";
    } else if ((size_t)n >= sizeof(stackbuf)) {
        heap = malloc((size_t)n + 1);
        if (heap) {
            vsnprintf(heap, (size_t)n + 1, format, al);
            msg = heap;
        } /* else: deliver the truncated stack copy */
    }

    lg->callback(lg->user, level, errnoval, context, msg);

    free(heap);
    errno = saved_errno;
}

static void shim_progress(xentoollog_logger *logger, const char *context,
                          const char *doing_what, int percent,
                          unsigned long done, unsigned long total)
{
    struct shim_logger *lg = shim_logger_of(logger);
    char msg[SHIM_STACK_MSG];
    int saved_errno = errno;
    int last;

    (void)total;
    if (!shim_level_enabled(lg, XTL_PROGRESS))
        return;
    /* libxl calls this with done==0 for each new context/doing_what; after
     * that only forward changes of the percentage. */
    last = atomic_exchange_explicit(&lg->last_percent, percent,
                                    memory_order_relaxed);
    if (done != 0 && last == percent)
        return;

    snprintf(msg, sizeof(msg), "%s: %d%%",
             doing_what ? doing_what : "progress", percent);
    if (shim_in_foreign_process(lg))
        shim_write_stderr(XTL_PROGRESS, context, msg);
    else
        lg->callback(lg->user, XTL_PROGRESS, -1, context, msg);
    errno = saved_errno;
}

static void shim_destroy(xentoollog_logger *logger)
{
    free(shim_logger_of(logger));
}

xentoollog_logger *libxenlight_sys_logger_new(libxenlight_sys_log_fn callback,
                                              void *user,
                                              xentoollog_level min_level)
{
    struct shim_logger *lg;

    if (!callback) {
        errno = EINVAL;
        return NULL;
    }
    lg = calloc(1, sizeof(*lg));
    if (!lg)
        return NULL;
    lg->vtable.vmessage = shim_vmessage;
    lg->vtable.progress = shim_progress;
    lg->vtable.destroy = shim_destroy;
    lg->callback = callback;
    lg->user = user;
    atomic_init(&lg->min_level, (int)min_level);
    atomic_init(&lg->last_percent, -1);
    lg->owner_pid = getpid();
    return &lg->vtable;
}

void libxenlight_sys_logger_set_min_level(xentoollog_logger *logger,
                                          xentoollog_level min_level)
{
    atomic_store_explicit(&shim_logger_of(logger)->min_level, (int)min_level,
                          memory_order_relaxed);
}

void libxenlight_sys_logger_destroy(xentoollog_logger *logger)
{
    xtl_logger_destroy(logger); /* NULL is ok; calls shim_destroy */
}

void libxenlight_sys_log(xentoollog_logger *logger, xentoollog_level level,
                         int errnoval, const char *context,
                         const char *message)
{
    xtl_log(logger, level, errnoval, context, "%s", message);
}

/*======================================================================*/
/* static inline functions of libxl_utils.h                              */

void libxenlight_sys_bitmap_set_any(libxl_bitmap *bitmap)
{
    libxl_bitmap_set_any(bitmap);
}

void libxenlight_sys_bitmap_set_none(libxl_bitmap *bitmap)
{
    libxl_bitmap_set_none(bitmap);
}

int libxenlight_sys_bitmap_equal(const libxl_bitmap *a, const libxl_bitmap *b,
                                 int nr_bits)
{
    return libxl_bitmap_equal(a, b, nr_bits);
}

/*======================================================================*/
/* Macros bindgen cannot evaluate                                        */

#define SHIM_MACRO(M, T) { #M, (uint64_t)(T)(M) }

static const struct libxenlight_sys_macro shim_macros[] = {
    SHIM_MACRO(LIBXL_API_VERSION, uint32_t),
    SHIM_MACRO(INVALID_DOMID, uint32_t),
    SHIM_MACRO(RANDOM_DOMID, uint32_t),
    SHIM_MACRO(LIBXL_EVENTMASK_ALL, uint64_t),
    SHIM_MACRO(LIBXL_MEMKB_DEFAULT, uint64_t),
    SHIM_MACRO(LIBXL_PCI_FUNC_ALL, uint32_t),
    SHIM_MACRO(LIBXL_MAX_GRANT_DEFAULT, uint32_t),
    SHIM_MACRO(LIBXL_CPUTOPOLOGY_INVALID_ENTRY, uint32_t),
    SHIM_MACRO(LIBXL_PCITOPOLOGY_INVALID_ENTRY, uint32_t),
    SHIM_MACRO(LIBXL_NUMAINFO_INVALID_ENTRY, uint32_t),
};

const struct libxenlight_sys_macro *libxenlight_sys_macros(size_t *n)
{
    *n = sizeof(shim_macros) / sizeof(shim_macros[0]);
    return shim_macros;
}

#define SHIM_LAYOUT(T) { #T, sizeof(T), _Alignof(T) }

static const struct libxenlight_sys_layout shim_layouts[] = {
    SHIM_LAYOUT(libxl_asyncop_how),
    SHIM_LAYOUT(libxl_asyncprogress_how),
    SHIM_LAYOUT(libxl_bitmap),
    SHIM_LAYOUT(libxl_childproc_hooks),
    SHIM_LAYOUT(libxl_defbool),
    SHIM_LAYOUT(libxl_device_disk),
    SHIM_LAYOUT(libxl_device_nic),
    SHIM_LAYOUT(libxl_domain_build_info),
    SHIM_LAYOUT(libxl_domain_config),
    SHIM_LAYOUT(libxl_domain_create_info),
    SHIM_LAYOUT(libxl_domain_restore_params),
    SHIM_LAYOUT(libxl_dominfo),
    SHIM_LAYOUT(libxl_event),
    SHIM_LAYOUT(libxl_event_hooks),
    SHIM_LAYOUT(libxl_osevent_hooks),
    SHIM_LAYOUT(libxl_physinfo),
    SHIM_LAYOUT(libxl_uuid),
    SHIM_LAYOUT(libxl_vcpuinfo),
    SHIM_LAYOUT(libxl_version_info),
    SHIM_LAYOUT(libxl_vminfo),
    SHIM_LAYOUT(xentoollog_logger),
    SHIM_LAYOUT(struct libxenlight_sys_layout),
    SHIM_LAYOUT(struct libxenlight_sys_macro),
};

const struct libxenlight_sys_layout *libxenlight_sys_layouts(size_t *n)
{
    *n = sizeof(shim_layouts) / sizeof(shim_layouts[0]);
    return shim_layouts;
}
