//! `domkit`: the command-line tool.
//!
//! - `domkit demo`: the main job: a real VM lifecycle on the default backend, printing each
//!   uniform event as it happens with timings; on QEMU through a private domkitd it starts
//!   and stops (examples/src/daemon_demo.rs).
//! - `domkit run CONFIG`: run a domain from a TOML/JSON config in the foreground.
//! - `domkit conformance`: run the conformance suite against a backend.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use domkit_conformance::{GuestOptions, SuiteReport, TestBackend};
use domkit_core::{
    Domain, DomainConfig, Driver, EventKind, ShutdownMode, ShutdownOptions, ShutdownWait,
    ShutoffReason, StartOptions, StoppedDetail,
};
use domkit_examples::{ensure_test_guest, print_event};
use futures::StreamExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Manage virtual machines on QEMU and Xen with one uniform lifecycle model.
#[derive(Parser, Debug)]
#[command(name = "domkit", version, about, long_about = None, after_help = domkitd::cli::EXIT_CODES_HELP)]
struct Cli {
    /// Hypervisor connection: `qemu:///session` (default) or `libxl:///` (Xen, needs the
    /// `libxl` feature and a dom0) for demo/run/conformance; for the domkitd verbs,
    /// `unix:///PATH` or `tcp://HOST:PORT` (with --ca/--cert/--key), default the local
    /// domkitd socket.
    #[arg(long, short = 'c', global = true, default_value = "qemu:///session")]
    connect: String,
    /// How to reach domkitd.
    #[command(flatten)]
    daemon: domkitd::cli::ConnectArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the test guest and walk its lifecycle (pause, resume, save, restore, reboot,
    /// graceful shutdown), printing each uniform event with timings. On QEMU it runs
    /// through a private domkitd it starts (its own directories and socket) and stops
    /// again, as users run domkit; `-c libxl:///` drives the Xen driver in-process.
    Demo {
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Drive an in-process driver instead of a private domkitd.
        #[arg(long)]
        in_process: bool,
    },
    /// Start a domain from a TOML/JSON config and print its events until it stops.
    /// SIGINT/SIGTERM request a graceful shutdown (destroy after --shutdown-timeout; a second
    /// signal destroys at once). Exit status: 0 shut down or saved, 3 destroyed, 4 crashed,
    /// 5 failed, 1 error, 2 usage.
    Run {
        /// The domain config (`.json` is JSON, anything else TOML).
        config: PathBuf,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds a graceful shutdown may take before the domain is destroyed.
        #[arg(long, default_value_t = 60)]
        shutdown_timeout: u64,
    },
    /// Run the conformance suite against a backend and print the table; exits non-zero on
    /// any failure.
    Conformance {
        /// Backend: `qemu` or `libxl` (default: from --connect).
        #[arg(long)]
        backend: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Run only scenarios whose name contains PATTERN.
        #[arg(long, value_name = "PATTERN")]
        only: Option<String>,
        /// List the scenarios and exit.
        #[arg(long)]
        list: bool,
        /// Also write the report, with the command and date, to FILE (e.g.
        /// docs/conformance/qemu.json, read by scripts/status-table.py).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
    },
    /// Serve one driver on stdin/stdout (JSON lines) until stdin closes: the separate
    /// manager process the durable-domain scenarios SIGKILL (domkit_conformance::manager).
    #[command(hide = true)]
    Manager {
        /// The state root (persistent).
        #[arg(long)]
        state_dir: PathBuf,
        /// The runtime root.
        #[arg(long)]
        runtime_dir: PathBuf,
        /// Domains die with this process instead of outliving it.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Print a shell completion script: `domkit completions bash > /etc/bash_completion.d/domkit`,
    /// `domkit completions zsh > "${fpath[1]}/_domkit"`, `domkit completions fish >
    /// ~/.config/fish/completions/domkit.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The domkitd verbs (virsh's names): define, list, start, shutdown, dominfo, event, ...
    #[command(flatten)]
    Daemon(domkitd::cli::Verb),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Qemu,
    Libxl,
}

fn parse_connect(uri: &str) -> Result<Backend, String> {
    match uri {
        "qemu:///session" | "qemu:///system" | "qemu" => Ok(Backend::Qemu),
        "libxl:///" | "xen:///" | "libxl" | "xen" => Ok(Backend::Libxl),
        other => Err(format!(
            "unknown connection URI {other:?}: use qemu:///session or libxl:///"
        )),
    }
}

/// `domkit completions SHELL`: the script on stdout (a closed pipe ends quietly).
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "domkit", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domkit: error: writing the completion script: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("domkit: error: {msg}\nhint: see `domkit --help`");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Completions { shell } = cli.command {
        return completions(shell);
    }
    if let Command::Daemon(verb) = cli.command {
        return ExitCode::from(domkitd::cli::main(Some(&cli.connect), &cli.daemon, verb));
    }
    let backend = match &cli.command {
        Command::Conformance {
            backend: Some(b), ..
        } => parse_connect(b),
        _ => parse_connect(&cli.connect),
    };
    let backend = match backend {
        Ok(b) => b,
        Err(e) => return usage_error(&e),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("domkit: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(backend, cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("domkit: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(backend: Backend, command: Command) -> anyhow::Result<u8> {
    match backend {
        Backend::Qemu => {
            use domkit_conformance::qemu::QemuTestBackend;
            let make_backend = || -> anyhow::Result<QemuTestBackend> {
                ensure_test_guest()?;
                QemuTestBackend::new().map_err(anyhow::Error::msg)
            };
            if let Command::Manager {
                state_dir,
                runtime_dir,
                ephemeral,
            } = &command
            {
                let mut options =
                    domkit_qemu::QemuDriverOptions::persistent(state_dir, runtime_dir);
                if *ephemeral {
                    options.ownership = domkit_qemu::Ownership::Ephemeral;
                }
                return match domkit_qemu::QemuDriver::open(options).await {
                    Ok(driver) => {
                        domkit_conformance::manager::serve(driver).await?;
                        Ok(0)
                    }
                    Err(e) => {
                        domkit_conformance::manager::refuse(&e);
                        Ok(1)
                    }
                };
            }
            if let Command::Demo {
                json,
                in_process: false,
            } = command
            {
                return domkit_examples::daemon_demo::run(json).await;
            }
            let make_driver = || Ok(domkit_qemu::QemuDriver::new(Default::default())?);
            run_command(command, make_backend, make_driver).await
        }
        Backend::Libxl => libxl_dispatch(command).await,
    }
}

/// Run `command` on one backend: `make_backend` gives the test backend (demo, conformance),
/// `make_driver` a plain driver (run).
async fn run_command<B: TestBackend>(
    command: Command,
    make_backend: impl FnOnce() -> anyhow::Result<B>,
    make_driver: impl FnOnce() -> anyhow::Result<B::Driver>,
) -> anyhow::Result<u8> {
    match command {
        Command::Demo { json, .. } => demo(&make_backend()?, json).await,
        Command::Run {
            config,
            paused,
            json,
            shutdown_timeout,
        } => run_config(&make_driver()?, config, paused, json, shutdown_timeout).await,
        Command::Conformance {
            json,
            only,
            list,
            record,
            ..
        } => {
            if list {
                return Ok(list_scenarios::<B>());
            }
            conformance(&make_backend()?, json, only, record).await
        }
        Command::Manager { .. } => {
            anyhow::bail!("`domkit manager` is not available for this backend yet")
        }
        Command::Daemon(_) | Command::Completions { .. } => {
            anyhow::bail!("the domkitd verbs talk to a domkitd, not to an in-process driver")
        }
    }
}

#[cfg(feature = "libxl")]
async fn libxl_dispatch(command: Command) -> anyhow::Result<u8> {
    use domkit_conformance::libxl::LibxlTestBackend;
    if let Command::Manager {
        state_dir,
        runtime_dir,
        ephemeral,
    } = &command
    {
        let mut options = domkit_libxl::LibxlOptions::persistent(state_dir, runtime_dir);
        if *ephemeral {
            options.ownership = domkit_libxl::Ownership::Ephemeral;
        }
        return match domkit_libxl::LibxlDriver::open(options).await {
            Ok(driver) => {
                domkit_conformance::manager::serve(driver).await?;
                Ok(0)
            }
            Err(e) => {
                domkit_conformance::manager::refuse(&e);
                Ok(1)
            }
        };
    }
    let make_backend = || LibxlTestBackend::new().map_err(anyhow::Error::msg);
    let make_driver = || Ok(domkit_libxl::LibxlDriver::new()?);
    run_command(command, make_backend, make_driver).await
}

#[cfg(not(feature = "libxl"))]
async fn libxl_dispatch(_command: Command) -> anyhow::Result<u8> {
    anyhow::bail!(
        "this domkit was built without the Xen backend\nhint: rebuild with \
         `cargo build -p domkit-examples --features libxl` (needs libxen-dev: scripts/install-deps.sh xen)"
    )
}

fn list_scenarios<B: TestBackend>() -> u8 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for (name, about) in domkit_conformance::runner::list::<B>() {
        // A reader that went away (`| head -n 1`) ends the listing quietly (println!
        // panicked with "Broken pipe").
        if writeln!(out, "{name:<28} {about}").is_err() {
            break;
        }
    }
    0
}

/// Time one step of the demo and print it.
async fn step<T, F>(name: &str, t0: Instant, json: bool, fut: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = domkit_core::Result<T>>,
{
    let started = Instant::now();
    let r = fut
        .await
        .with_context(|| format!("demo step `{name}` failed"))?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the event printer show the step's events before the step's own line.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if json {
        println!(
            "{}",
            serde_json::json!({"step": name, "ms": (ms * 10.0).round() / 10.0, "elapsed_s": t0.elapsed().as_secs_f64()})
        );
    } else {
        println!("== {name:<34} {ms:9.1} ms");
    }
    Ok(r)
}

async fn demo<B: TestBackend>(backend: &B, json: bool) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    let driver = backend.driver();
    let name = format!("domkit-demo-{}", std::process::id());
    let domain = driver
        .define(backend.guest_config(&name, GuestOptions::default()))
        .await?;
    if !json {
        println!(
            "domkit demo on the {} backend: domain {}",
            backend.name(),
            domain.id()
        );
    }
    let mut events = domain.subscribe();
    let printer = tokio::spawn(async move {
        let mut n = 0u32;
        while let Some(ev) = events.next().await {
            print_event(&ev, t0, json);
            n += 1;
        }
        n
    });
    let result = demo_steps(backend, &domain, t0, json).await;
    if result.is_err() {
        let _ = domain.destroy().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = driver.undefine(&name).await;
    printer.abort();
    result?;
    let state = domain.state();
    if !json {
        println!(
            "demo finished in {:.1} s; final state: {state}",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

async fn demo_steps<B: TestBackend>(
    backend: &B,
    domain: &<B::Driver as Driver>::Domain,
    t0: Instant,
    json: bool,
) -> anyhow::Result<()> {
    let ready = Duration::from_secs(180);
    step("start", t0, json, domain.start(StartOptions::default())).await?;
    step("wait for the guest to boot", t0, json, async {
        backend
            .wait_guest_ready(domain, ready)
            .await
            .map_err(|e| domkit_core::Error::Backend {
                backend: backend.name().into(),
                message: e,
            })
    })
    .await?;
    step("pause", t0, json, domain.pause()).await?;
    step("resume", t0, json, domain.resume()).await?;
    let save = backend.scratch_dir().join("demo.save");
    step("save", t0, json, domain.save(&save)).await?;
    let size = std::fs::metadata(&save).map(|m| m.len()).unwrap_or(0);
    if !json {
        println!(
            "   save file: {} ({:.1} MiB)",
            save.display(),
            size as f64 / 1048576.0
        );
    }
    step(
        "restore",
        t0,
        json,
        domain.restore(&save, Default::default()),
    )
    .await?;
    let _ = std::fs::remove_file(&save);
    step(
        "reboot",
        t0,
        json,
        domain.reboot(ShutdownMode::Default, ready),
    )
    .await?;
    step("wait for the guest to boot again", t0, json, async {
        backend
            .wait_guest_ready(domain, ready)
            .await
            .map_err(|e| domkit_core::Error::Backend {
                backend: backend.name().into(),
                message: e,
            })
    })
    .await?;
    let outcome = step(
        "graceful shutdown (wait: completed)",
        t0,
        json,
        domain.shutdown(ShutdownOptions {
            mode: ShutdownMode::Default,
            wait: ShutdownWait::Completed,
            timeout: Duration::from_secs(120),
            destroy_on_timeout: true,
        }),
    )
    .await?;
    anyhow::ensure!(
        domain.state() == domkit_core::DomainState::Shutoff(ShutoffReason::Shutdown),
        "after shutdown ({outcome:?}) the domain is {}",
        domain.state()
    );
    Ok(())
}

async fn run_config<D: Driver>(
    driver: &D,
    path: PathBuf,
    paused: bool,
    json: bool,
    shutdown_timeout: u64,
) -> anyhow::Result<u8> {
    use tokio::signal::unix::{signal, SignalKind};
    let t0 = Instant::now();
    let config = DomainConfig::load(&path)?;
    let domain = driver.define(config).await?;
    let mut events = domain.subscribe();
    domain.start(StartOptions { paused }).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut signals = 0u32;
    let code = loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { break 1 };
                print_event(&ev, t0, json);
                if let EventKind::Stopped(detail) = ev.kind {
                    if domain.state().is_shutoff() {
                        break match detail {
                            StoppedDetail::Shutdown | StoppedDetail::Saved => 0,
                            StoppedDetail::Destroyed => 3,
                            StoppedDetail::Crashed => 4,
                            StoppedDetail::Failed => 5,
                        };
                    }
                }
            }
            _ = async { tokio::select! { _ = sigint.recv() => (), _ = sigterm.recv() => () } } => {
                signals += 1;
                if signals == 1 {
                    eprintln!("domkit: signal received: shutting down (destroy after {shutdown_timeout} s; signal again to destroy now)");
                    let d = domain.clone();
                    tokio::spawn(async move {
                        let _ = d.shutdown(ShutdownOptions {
                            mode: ShutdownMode::Default,
                            wait: ShutdownWait::Completed,
                            timeout: Duration::from_secs(shutdown_timeout),
                            destroy_on_timeout: true,
                        }).await;
                    });
                } else {
                    eprintln!("domkit: second signal: destroying");
                    domain.destroy().await?;
                }
            }
        }
    };
    let name = domain.id().name.clone();
    let _ = driver.undefine(&name).await;
    Ok(code)
}

async fn conformance<B: TestBackend>(
    backend: &B,
    json: bool,
    only: Option<String>,
    record: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let report: SuiteReport = domkit_conformance::run(backend, only.as_deref()).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
        println!("{}", report.summary_line());
    }
    if let Some(path) = record {
        let args: Vec<String> = std::env::args().collect();
        report
            .write_record(&path, &args.join(" "))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.ok() { 0 } else { 1 })
}
