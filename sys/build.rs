//! Build script of `libxenlight-sys`.
//!
//! 1. finds the libxl headers (env override, `pkg-config xenlight`, then the
//!    default include directories) and libclang, and stops with ONE clear
//!    message if either is missing;
//! 2. lists the `LIBXL_HAVE_*` macros defined under the pinned API version
//!    (the C preprocessor's `-dM` output, so valueless and conditional
//!    defines are seen exactly as C code sees them);
//! 3. runs bindgen over `shim/shim.h` (which includes `libxl.h`,
//!    `libxl_event.h`, `libxl_utils.h`, `libxl_uuid.h` and `xentoollog.h`);
//! 4. compiles `shim/shim.c` with `cc` under the same `LIBXL_API_VERSION`;
//! 5. links `xenlight` and `xentoollog` and writes `build_info.rs`.
//!
//! Every bindgen option lives in [`bindgen_builder`]; the crate docs record
//! them (section "Regenerating / bindgen flags") and `BINDGEN_FLAGS` exposes
//! the exact command line used for a given build.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};

/// The libxl API this crate is written against. See the crate docs
/// ("Choice of `LIBXL_API_VERSION`") before changing it.
const LIBXL_API_VERSION: u32 = 0x041400;

/// bindgen version the crate docs record; a different one only warns.
const DOCUMENTED_BINDGEN_VERSION: &str = "0.70.1";

const MISSING_DEPS: &str = "install libxen-dev and libclang-dev (scripts/install-deps.sh xen)";

/// Print one clear error and stop the build (no backtrace, no bindgen noise).
fn fail(what: &str) -> ! {
    eprintln!("libxenlight-sys: {what}: {MISSING_DEPS}");
    process::exit(1);
}

/// Runs `pkg-config <args> xenlight`, returning its whitespace-separated
/// output, or `None` if pkg-config or the `xenlight` module is unavailable.
fn pkg_config(args: &[&str]) -> Option<Vec<String>> {
    let out = Command::new(env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into()))
        .args(args)
        .arg("xenlight")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    Some(s.split_whitespace().map(str::to_owned).collect())
}

/// Include directories to search for the libxl headers, in order.
fn include_dirs() -> Vec<PathBuf> {
    if let Some(dir) = env::var_os("XENLIGHT_INCLUDE_DIR") {
        return env::split_paths(&dir).collect();
    }
    let mut dirs: Vec<PathBuf> = pkg_config(&["--cflags-only-I"])
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.strip_prefix("-I"))
        .map(PathBuf::from)
        .collect();
    for d in ["/usr/include", "/usr/local/include"] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(d.into());
        }
    }
    dirs
}

/// Library directories to pass to the linker (empty: the default ones).
fn lib_dirs() -> Vec<PathBuf> {
    if let Some(dir) = env::var_os("XENLIGHT_LIB_DIR") {
        return env::split_paths(&dir).collect();
    }
    pkg_config(&["--libs-only-L"])
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.strip_prefix("-L"))
        .map(PathBuf::from)
        .collect()
}

/// Loads libclang the way bindgen does, without bindgen's panic message.
fn check_libclang() -> String {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let version = std::panic::catch_unwind(bindgen::clang_version);
    std::panic::set_hook(hook);
    match version {
        Ok(v) => v.full,
        Err(_) => fail("libclang not found (set LIBCLANG_PATH if it is installed elsewhere)"),
    }
}

/// Names of the `LIBXL_HAVE_*` macros defined under `LIBXL_API_VERSION`
/// (without the prefix), sorted.
fn libxl_have(shim_dir: &Path, includes: &[PathBuf], out_dir: &Path) -> Vec<String> {
    let probe = out_dir.join("libxl_have_probe.c");
    fs::write(&probe, "#include \"shim.h\"\n").expect("write probe");
    let expanded = cc::Build::new()
        .file(&probe)
        .include(shim_dir)
        .includes(includes)
        .define(
            "LIBXL_API_VERSION",
            format!("{LIBXL_API_VERSION:#08x}").as_str(),
        )
        .flag("-dM")
        .cargo_metadata(false)
        .try_expand()
        .unwrap_or_else(|e| fail(&format!("the C preprocessor failed on shim/shim.h ({e})")));
    let mut have: Vec<String> = String::from_utf8_lossy(&expanded)
        .lines()
        .filter_map(|l| l.strip_prefix("#define LIBXL_HAVE_"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    have.sort();
    have.dedup();
    have
}

/// Names of the libxl IDL types (those with a `libxl_<type>_dispose`): they
/// own heap memory, so the bindings must not derive `Copy`/`Clone` for them.
fn idl_owned_types(includes: &[PathBuf]) -> Vec<String> {
    let mut types = Vec::new();
    for dir in includes {
        for h in ["libxl.h", "_libxl_types.h"] {
            let Ok(text) = fs::read_to_string(dir.join(h)) else {
                continue;
            };
            for line in text.lines() {
                let line = line.trim_start();
                let Some(rest) = line.strip_prefix("void libxl_") else {
                    continue;
                };
                let Some((name, args)) = rest.split_once("_dispose(") else {
                    continue;
                };
                // `void libxl_T_dispose(libxl_T *p)`: the argument type names T.
                if args.starts_with(&format!("libxl_{name} *")) {
                    types.push(format!("libxl_{name}"));
                }
            }
        }
        if !types.is_empty() {
            break;
        }
    }
    types.sort();
    types.dedup();
    types
}

/// Turns C comments into rustdoc: the shim's own `@rustdoc` comments are
/// Markdown; libxl's comments are kept verbatim in a `text` block so that
/// rustdoc neither parses them (bogus links/HTML) nor runs them as doctests.
#[derive(Debug)]
struct Callbacks;

impl bindgen::callbacks::ParseCallbacks for Callbacks {
    fn process_comment(&self, comment: &str) -> Option<String> {
        let trimmed = comment.trim_start();
        if let Some(md) = trimmed.strip_prefix("@rustdoc") {
            return Some(md.trim_start_matches([' ', '\n']).to_owned());
        }
        Some(format!("```text\n{}\n```", comment.trim_end()))
    }
}

/// The single place where the bindgen options are written down.
fn bindgen_builder(shim_h: &Path, includes: &[PathBuf], no_copy: &[String]) -> bindgen::Builder {
    let mut b = bindgen::Builder::default()
        .header(shim_h.to_string_lossy())
        .clang_arg(format!("-DLIBXL_API_VERSION={LIBXL_API_VERSION:#08x}"))
        .clang_args(includes.iter().map(|d| format!("-I{}", d.display())))
        // Output shape.
        .rust_target(bindgen::RustTarget::Stable_1_73)
        .formatter(bindgen::Formatter::Prettyplease)
        .merge_extern_blocks(true)
        .sort_semantically(true)
        .layout_tests(false)
        .wrap_unsafe_ops(true)
        .derive_default(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        // Real Rust unions even where a member is a non-Copy IDL type
        // (that member becomes ManuallyDrop<T>).
        .manually_drop_union(".*")
        // What to bind.
        .allowlist_function("libxl_.*")
        .allowlist_function("xtl_.*")
        .allowlist_function("libxenlight_sys_.*")
        .blocklist_function("libxl__.*")
        .allowlist_type("libxl_.*")
        .allowlist_type("xentoollog_.*")
        .allowlist_type("libxenlight_sys_.*")
        .allowlist_var("LIBXL_.*")
        .allowlist_var("XTL_.*")
        .allowlist_var("libxl_.*")
        // Macros using `~`: cexpr ignores the U/ULL suffixes and casts, so
        // bindgen would emit them as i32 -1 (or skip them). lib.rs defines
        // them by hand; a test checks them against the C compiler.
        .blocklist_item(
            "INVALID_DOMID|RANDOM_DOMID|LIBXL_EVENTMASK_ALL|LIBXL_MEMKB_DEFAULT|LIBXL_PCI_FUNC_ALL",
        )
        // libc types: use the libc crate's definitions.
        .blocklist_type(
            "FILE|_IO_.*|pollfd|timeval|pid_t|__pid_t|__time_t|__suseconds_t|__off_t|__off64_t",
        )
        .raw_line("use libc::{pid_t, pollfd, timeval, FILE};")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // Must be last: bindgen only asks the last callback about comments.
        .parse_callbacks(Box::new(Callbacks));
    for t in no_copy {
        b = b.no_copy(format!("^{t}$"));
    }
    b
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let shim_dir = manifest_dir.join("shim");
    let shim_h = shim_dir.join("shim.h");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/shim.c");
    for var in [
        "XENLIGHT_INCLUDE_DIR",
        "XENLIGHT_LIB_DIR",
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "LIBCLANG_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    // 1. Headers, then libclang, before anything prints a wall of errors.
    let includes = include_dirs();
    if !includes.iter().any(|d| d.join("libxl.h").is_file()) {
        fail("libxl.h not found");
    }
    let clang_version = check_libclang();

    // 2. LIBXL_HAVE_* as the C compiler sees them.
    let have = libxl_have(&shim_dir, &includes, &out_dir);

    // 3. bindgen.
    let builder = bindgen_builder(&shim_h, &includes, &idl_owned_types(&includes));
    let flags = builder.command_line_flags().join(" ");
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed on shim/shim.h ({e})")));
    let bindings = bindings.to_string();
    let bindgen_version = bindings
        .lines()
        .next()
        .and_then(|l| l.split("rust-bindgen ").nth(1))
        .map(|v| v.trim_end_matches(" */").trim().to_owned())
        .unwrap_or_default();
    if bindgen_version != DOCUMENTED_BINDGEN_VERSION {
        println!(
            "cargo:warning=libxenlight-sys: generated with bindgen {bindgen_version}, \
             the crate docs record {DOCUMENTED_BINDGEN_VERSION}: review the bindings and update the docs"
        );
    }
    fs::write(out_dir.join("bindings.rs"), bindings).expect("write bindings.rs");

    // 4. The shim (emits the link line for the static shim library first,
    //    so that libxenlight, linked after it, resolves its references).
    cc::Build::new()
        .file(shim_dir.join("shim.c"))
        .include(&shim_dir)
        .includes(&includes)
        .define(
            "LIBXL_API_VERSION",
            format!("{LIBXL_API_VERSION:#08x}").as_str(),
        )
        .std("gnu11")
        .warnings(true)
        .extra_warnings(true)
        .compile("libxenlight_sys_shim");

    // 5. Link libxl and xentoollog (xenctrl, xenstore, ... come in as
    //    DT_NEEDED of libxenlight.so; the shim calls only xtl_* directly).
    for dir in lib_dirs() {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    println!("cargo:rustc-link-lib=dylib=xenlight");
    println!("cargo:rustc-link-lib=dylib=xentoollog");

    // Metadata for dependents' build scripts (DEP_XENLIGHT_<KEY>).
    let joined = env::join_paths(&includes).expect("include dirs");
    println!("cargo:include={}", joined.to_string_lossy());
    println!("cargo:shim_include={}", shim_dir.display());
    println!("cargo:api_version={LIBXL_API_VERSION:#08x}");
    println!("cargo:have={}", have.join(","));

    let xenlight_version = pkg_config(&["--modversion"]).and_then(|v| v.into_iter().next());
    let mut info = String::new();
    writeln!(
        info,
        "/// The `LIBXL_API_VERSION` the bindings and the shim were built with."
    )
    .unwrap();
    writeln!(
        info,
        "pub const LIBXL_API_VERSION: u32 = {LIBXL_API_VERSION:#08x};"
    )
    .unwrap();
    writeln!(
        info,
        "/// Every `LIBXL_HAVE_<NAME>` macro defined by the headers under [`LIBXL_API_VERSION`]\n\
         /// (as `<NAME>`, sorted), including valueless defines that bindgen skips."
    )
    .unwrap();
    writeln!(info, "pub const LIBXL_HAVE: &[&str] = &{have:?};").unwrap();
    writeln!(
        info,
        "/// `pkg-config --modversion xenlight` at build time, if available."
    )
    .unwrap();
    writeln!(
        info,
        "pub const XENLIGHT_VERSION: Option<&str> = {xenlight_version:?};"
    )
    .unwrap();
    writeln!(
        info,
        "/// Version of the bindgen crate that generated the bindings."
    )
    .unwrap();
    writeln!(
        info,
        "pub const BINDGEN_VERSION: &str = {bindgen_version:?};"
    )
    .unwrap();
    writeln!(info, "/// Version string of the libclang bindgen used.").unwrap();
    writeln!(info, "pub const CLANG_VERSION: &str = {clang_version:?};").unwrap();
    writeln!(
        info,
        "/// The bindgen command line equivalent to this build's options."
    )
    .unwrap();
    writeln!(info, "pub const BINDGEN_FLAGS: &str = {flags:?};").unwrap();
    fs::write(out_dir.join("build_info.rs"), info).expect("write build_info.rs");
}
