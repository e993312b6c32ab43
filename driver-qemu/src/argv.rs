//! The QEMU command line for a [`DomainConfig`] (pure: no I/O).
//!
//! Always an argument vector, never a shell string. Fixed choices, and why:
//! - `-S`: vCPUs start stopped; start and restore send `cont` themselves, after the monitor
//!   is connected, so no event is missed and "start paused" is just "no cont".
//! - `-no-shutdown`: a guest poweroff leaves the process (stopped) for domkit's policy
//!   decision, which makes a fake reboot (`system_reset` + `cont`) possible. `-no-reboot` is
//!   never used: it would turn guest reboots and host resets into shutdowns.
//! - `-action panic=pause`: a panic stops the guest and keeps it; destroy and restart after a
//!   crash are domkit's policy actions.
//! - The monitor is a listening socket domkit binds in the domain's private runtime directory
//!   before QEMU starts and hands to it as fd [`MONITOR_FD`] (`fd=3,server=on`, as libvirt
//!   does): nobody can take it first, and QEMU accepts a new connection after a manager is
//!   gone, so the next manager can reattach (§11). Guest agent and channel sockets are
//!   QEMU's listening sockets in the same directory, connected to on demand.
//! - `-nodefaults -no-user-config -display none`: only the devices the config asks for.

use std::path::{Path, PathBuf};

use domkit_core::{Boot, ChannelKind, ConsoleKind, DiskFormat, DomainConfig, NicBackend};

use crate::devices::{Address, DeviceSet, VIRTIO_SERIAL_SLOT};

/// The fd number QEMU inherits its listening monitor socket as.
pub const MONITOR_FD: i32 = 3;

/// The QEMU binary used when the config names none (looked up in `PATH`).
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// The machine type: i440fx, whose PIIX4 power management offers S3 by default.
pub const MACHINE: &str = "pc";

/// The accelerator actually used for a launch (the config's `Auto` already resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// Software emulation.
    Tcg,
    /// KVM.
    Kvm,
}

impl AccelChoice {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AccelChoice::Tcg => "tcg",
            AccelChoice::Kvm => "kvm",
        }
    }
}

/// The files of one domain in its private runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPaths {
    /// The directory (mode 0700).
    pub dir: PathBuf,
    /// The QMP socket domkit listens on.
    pub qmp_socket: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
}

impl DomainPaths {
    /// The paths inside `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        DomainPaths {
            qmp_socket: dir.join("qmp.sock"),
            qemu_log: dir.join("qemu.log"),
            dir,
        }
    }

    /// The socket of the virtio-serial channel named `port` (the guest agent's is
    /// `agent.sock`).
    pub fn channel_socket(&self, kind: ChannelKind, port: &str) -> PathBuf {
        match kind {
            ChannelKind::GuestAgent => self.dir.join("agent.sock"),
            ChannelKind::Plain => self.dir.join(format!("channel-{port}.sock")),
        }
    }

    /// The socket of console `index` (QEMU listens; the manager connects for a console
    /// stream, §12.4): `console0.sock`, `console1.sock`...
    pub fn console_socket(&self, index: usize) -> PathBuf {
        self.dir.join(format!("console{index}.sock"))
    }

    /// The log file of console `index` (unless the config names one): `serial.log` for the
    /// first, `console-N.log` for the others.
    pub fn console_log(&self, index: usize) -> PathBuf {
        if index == 0 {
            self.dir.join("serial.log")
        } else {
            self.dir.join(format!("console-{index}.log"))
        }
    }
}

/// Why a command line could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// QEMU options are text: a path that is not UTF-8 cannot be passed reliably.
    #[error("{field} path {path:?} is not valid UTF-8: rename it or use a UTF-8 path")]
    NonUtf8Path {
        /// Which field.
        field: String,
        /// The path.
        path: PathBuf,
    },
    /// The devices do not fit or clash (§14).
    #[error("{0}")]
    Devices(domkit_core::ConfigError),
}

/// Build the argument vector (binary first) that launches `config`, with the devices of
/// its config (addresses assigned by [`DeviceSet::from_config`]).
///
/// `incoming`: start waiting for a migration stream (`-incoming defer`, for restore).
pub fn build_argv(
    config: &DomainConfig,
    accel: AccelChoice,
    paths: &DomainPaths,
    incoming: bool,
) -> Result<Vec<String>, ArgvError> {
    let devices = DeviceSet::from_config(config, config.uuid.unwrap_or_default())
        .map_err(ArgvError::Devices)?;
    build_argv_with(config, &devices, accel, paths, incoming)
}

/// As [`build_argv`], with these devices instead of the config's (a restore rebuilds the
/// saved instance's devices, hotplugged ones included, at their addresses).
pub fn build_argv_with(
    config: &DomainConfig,
    devices: &DeviceSet,
    accel: AccelChoice,
    paths: &DomainPaths,
    incoming: bool,
) -> Result<Vec<String>, ArgvError> {
    let mut argv = Vec::new();
    let mut push = |args: &[&str]| argv.extend(args.iter().map(|a| a.to_string()));

    let binary = match &config.qemu.binary {
        Some(path) => utf8("qemu.binary", path)?,
        None => DEFAULT_BINARY.to_string(),
    };
    push(&[&binary]);
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", opt(&config.name)),
    ]);
    if let Some(uuid) = config.uuid {
        push(&["-uuid", &uuid.to_string()]);
    }
    push(&["-machine", MACHINE, "-accel", accel.as_str()]);
    push(&["-m", &config.memory_mib.to_string()]);
    push(&["-smp", &config.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-msg", "timestamp=on"]);
    push(&["-S", "-no-shutdown", "-action", "panic=pause"]);

    push(&[
        "-chardev",
        &format!("socket,id=mon0,fd={MONITOR_FD},server=on,wait=off"),
        "-mon",
        "chardev=mon0,mode=control",
    ]);

    // Consoles: a logged serial port when the config lists none.
    let default_console = [domkit_core::Console::default()];
    let consoles = if config.consoles.is_empty() {
        &default_console[..]
    } else {
        &config.consoles[..]
    };
    let needs_virtio_serial =
        !config.channels.is_empty() || consoles.iter().any(|c| c.kind == ConsoleKind::Pv);
    if needs_virtio_serial {
        push(&[
            "-device",
            &format!("virtio-serial-pci,id=vser0,bus=pci.0,addr={VIRTIO_SERIAL_SLOT:#x}"),
        ]);
    }
    for (i, console) in consoles.iter().enumerate() {
        let log = match &console.log {
            Some(p) => p.clone(),
            None => paths.console_log(i),
        };
        let log = utf8(&format!("consoles[{i}].log"), &log)?;
        let sock = utf8(&format!("consoles[{i}] socket"), &paths.console_socket(i))?;
        // A listening socket for console streams, logged by QEMU itself: the log is
        // written whether or not a client is connected (§12.4).
        push(&[
            "-chardev",
            &format!(
                "socket,id=console{i},path={},server=on,wait=off,logfile={}",
                opt(&sock),
                opt(&log)
            ),
        ]);
        match console.kind {
            ConsoleKind::Serial => push(&["-serial", &format!("chardev:console{i}")]),
            ConsoleKind::Pv => push(&[
                "-device",
                &format!("virtconsole,bus=vser0.0,chardev=console{i},id=vcon{i}"),
            ]),
        }
    }

    for (i, channel) in config.channels.iter().enumerate() {
        let port = channel.port_name();
        let sock = utf8(
            &format!("channels[{i}] socket"),
            &paths.channel_socket(channel.kind, port),
        )?;
        push(&[
            "-chardev",
            &format!("socket,id=chan{i},path={},server=on,wait=off", opt(&sock)),
            "-device",
            &format!(
                "virtserialport,bus=vser0.0,chardev=chan{i},name={},id=port{i}",
                opt(port)
            ),
        ]);
    }

    match &config.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            // -kernel/-initrd/-append take their value verbatim (no option-list parsing).
            push(&["-kernel", &utf8("boot.kernel", kernel)?]);
            if let Some(initrd) = initrd {
                push(&["-initrd", &utf8("boot.initrd", initrd)?]);
            }
            if !cmdline.is_empty() {
                push(&["-append", cmdline]);
            }
        }
        Boot::Disk { .. } => {}
    }
    let boot_disk = match config.boot {
        Boot::Disk { index } => Some(index),
        Boot::Kernel { .. } => None,
    };
    for (i, live) in devices.disks.iter().enumerate() {
        let disk = &live.disk;
        let id = disk.device_id(i);
        let path = utf8(&format!("disks[{i}].path"), &disk.path)?;
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let node = &live.node;
        if disk.cdrom {
            let file = if live.ejected {
                String::new()
            } else {
                format!("file={},format={format},", opt(&path))
            };
            push(&[
                "-drive",
                &format!("{file}if=none,id={node},media=cdrom,readonly=on"),
            ]);
            let (bus, unit) = match live.addr {
                Address::Ide(bus, unit) => (bus, unit),
                Address::Pci(_) => (0, 0),
            };
            push(&[
                "-device",
                &format!("ide-cd,drive={node},id={id},bus=ide.{bus},unit={unit}"),
            ]);
            continue;
        }
        let readonly = if disk.readonly { "on" } else { "off" };
        push(&[
            "-drive",
            &format!(
                "file={},format={format},if=none,id={node},readonly={readonly}",
                opt(&path)
            ),
        ]);
        let bootindex = if boot_disk == Some(i) {
            ",bootindex=0"
        } else {
            ""
        };
        push(&[
            "-device",
            &format!(
                "virtio-blk-pci,drive={node},id={id},serial={id},bus=pci.0,addr={}{bootindex}",
                pci_addr(live.addr)
            ),
        ]);
    }

    for (i, live) in devices.nics.iter().enumerate() {
        let nic = &live.nic;
        let id = nic.device_id(i);
        let netdev = match &nic.backend {
            NicBackend::User => format!("user,id=net-{id}"),
            NicBackend::Bridge(bridge) => format!("bridge,id=net-{id},br={}", opt(bridge)),
        };
        let mac = match &nic.mac {
            Some(mac) => format!(",mac={}", opt(mac)),
            None => String::new(),
        };
        push(&[
            "-netdev",
            &netdev,
            "-device",
            &format!(
                "virtio-net-pci,netdev=net-{id},id={id}{mac},bus=pci.0,addr={}",
                pci_addr(live.addr)
            ),
        ]);
    }

    if config.qemu.pvpanic {
        push(&["-device", "pvpanic"]);
    }
    if incoming {
        push(&["-incoming", "defer"]);
    }
    Ok(argv)
}

fn pci_addr(addr: Address) -> String {
    match addr {
        Address::Pci(slot) => format!("{slot:#x}"),
        Address::Ide(..) => "0".into(),
    }
}

/// Escape a value inside a QEMU option list (`key=value,...`): a comma is doubled.
pub fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn utf8(field: &str, path: &Path) -> Result<String, ArgvError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| ArgvError::NonUtf8Path {
            field: field.to_owned(),
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{Channel, Console, Disk, Nic};

    fn config() -> DomainConfig {
        let mut c = DomainConfig::with_kernel("web1", 128, "/boot/vmlinuz".into());
        c.uuid = Some(
            "4c1e0a4e-8f1a-4a57-9a0e-6b8f0a1c2d3e"
                .parse()
                .expect("uuid"),
        );
        if let Boot::Kernel {
            initrd, cmdline, ..
        } = &mut c.boot
        {
            *initrd = Some("/boot/initrd, v2.img".into());
            *cmdline = "console=ttyS0 domkit.ignore_shutdown=1".into();
        }
        c.channels.push(Channel {
            kind: ChannelKind::GuestAgent,
            name: None,
        });
        c
    }

    fn paths() -> DomainPaths {
        DomainPaths::new("/run/domkit/qemu/web1")
    }

    /// The value following `flag`, for every occurrence.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn fixed_lifecycle_flags_are_always_there_and_no_reboot_never() {
        let argv = build_argv(&config(), AccelChoice::Tcg, &paths(), false).expect("argv");
        assert_eq!(argv[0], DEFAULT_BINARY);
        for flag in ["-S", "-no-shutdown", "-nodefaults", "-no-user-config"] {
            assert!(argv.iter().any(|a| a == flag), "{flag} missing: {argv:?}");
        }
        assert!(!argv.iter().any(|a| a == "-no-reboot"));
        assert_eq!(values(&argv, "-action"), ["panic=pause"]);
        assert_eq!(values(&argv, "-accel"), ["tcg"]);
        assert_eq!(values(&argv, "-machine"), ["pc"]);
        assert_eq!(values(&argv, "-m"), ["128"]);
        assert_eq!(values(&argv, "-smp"), ["1"]);
        assert_eq!(
            values(&argv, "-uuid"),
            ["4c1e0a4e-8f1a-4a57-9a0e-6b8f0a1c2d3e"]
        );
        assert!(!argv.iter().any(|a| a == "-incoming"));
    }

    #[test]
    fn monitor_is_an_inherited_listening_socket() {
        let argv = build_argv(&config(), AccelChoice::Kvm, &paths(), false).expect("argv");
        let chardevs = values(&argv, "-chardev");
        assert!(chardevs.contains(&"socket,id=mon0,fd=3,server=on,wait=off"));
        assert_eq!(values(&argv, "-mon"), ["chardev=mon0,mode=control"]);
        assert_eq!(values(&argv, "-accel"), ["kvm"]);
    }

    #[test]
    fn kernel_boot_values_are_verbatim_and_option_values_escape_commas() {
        let argv = build_argv(&config(), AccelChoice::Tcg, &paths(), false).expect("argv");
        assert_eq!(values(&argv, "-kernel"), ["/boot/vmlinuz"]);
        // -initrd is not an option list: the comma stays single.
        assert_eq!(values(&argv, "-initrd"), ["/boot/initrd, v2.img"]);
        assert_eq!(
            values(&argv, "-append"),
            ["console=ttyS0 domkit.ignore_shutdown=1"]
        );
        let mut c = config();
        c.consoles.push(Console {
            kind: ConsoleKind::Serial,
            log: Some("/var/log/a,b.log".into()),
        });
        let argv = build_argv(&c, AccelChoice::Tcg, &paths(), false).expect("argv");
        assert!(values(&argv, "-chardev").contains(
            &"socket,id=console0,path=/run/domkit/qemu/web1/console0.sock,server=on,wait=off,logfile=/var/log/a,,b.log"
        ));
    }

    #[test]
    fn default_console_is_a_logged_serial_port_and_agent_a_virtio_serial_port() {
        let argv = build_argv(&config(), AccelChoice::Tcg, &paths(), false).expect("argv");
        let chardevs = values(&argv, "-chardev");
        assert!(chardevs.contains(
            &"socket,id=console0,path=/run/domkit/qemu/web1/console0.sock,server=on,wait=off,logfile=/run/domkit/qemu/web1/serial.log"
        ));
        assert_eq!(values(&argv, "-serial"), ["chardev:console0"]);
        assert!(chardevs
            .contains(&"socket,id=chan0,path=/run/domkit/qemu/web1/agent.sock,server=on,wait=off"));
        let devices = values(&argv, "-device");
        assert!(devices.contains(&"virtio-serial-pci,id=vser0,bus=pci.0,addr=0x3"));
        assert!(devices.contains(
            &"virtserialport,bus=vser0.0,chardev=chan0,name=org.qemu.guest_agent.0,id=port0"
        ));
        assert!(devices.contains(&"pvpanic"));
    }

    #[test]
    fn pvpanic_only_when_asked_and_incoming_for_restore() {
        let mut c = config();
        c.qemu.pvpanic = false;
        let argv = build_argv(&c, AccelChoice::Tcg, &paths(), true).expect("argv");
        assert!(!values(&argv, "-device").contains(&"pvpanic"));
        assert_eq!(values(&argv, "-incoming"), ["defer"]);
    }

    #[test]
    fn disks_nics_and_disk_boot() {
        let mut c = config();
        c.boot = Boot::Disk { index: 1 };
        c.disks = vec![
            Disk {
                id: None,
                path: "/img/a.raw".into(),
                format: DiskFormat::Raw,
                readonly: true,
                cdrom: false,
            },
            Disk {
                id: None,
                path: "/img/b.qcow2".into(),
                format: DiskFormat::Qcow2,
                readonly: false,
                cdrom: false,
            },
        ];
        c.nics = vec![Nic {
            id: None,
            mac: Some("52:54:00:12:34:56".into()),
            backend: NicBackend::User,
        }];
        c.qemu.binary = Some("/opt/qemu/bin/qemu-system-x86_64".into());
        let argv = build_argv(&c, AccelChoice::Tcg, &paths(), false).expect("argv");
        assert_eq!(argv[0], "/opt/qemu/bin/qemu-system-x86_64");
        assert!(!argv.iter().any(|a| a == "-kernel"));
        assert_eq!(
            values(&argv, "-drive"),
            [
                "file=/img/a.raw,format=raw,if=none,id=disk0,readonly=on",
                "file=/img/b.qcow2,format=qcow2,if=none,id=disk1,readonly=off"
            ]
        );
        let devices = values(&argv, "-device");
        assert!(devices
            .contains(&"virtio-blk-pci,drive=disk0,id=disk0,serial=disk0,bus=pci.0,addr=0x4"));
        assert!(devices.contains(
            &"virtio-blk-pci,drive=disk1,id=disk1,serial=disk1,bus=pci.0,addr=0x5,bootindex=0"
        ));
        assert_eq!(values(&argv, "-netdev"), ["user,id=net-nic0"]);
        assert!(devices.contains(
            &"virtio-net-pci,netdev=net-nic0,id=nic0,mac=52:54:00:12:34:56,bus=pci.0,addr=0x6"
        ));
    }

    #[test]
    fn non_utf8_paths_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut c = config();
        if let Boot::Kernel { kernel, .. } = &mut c.boot {
            *kernel = PathBuf::from(std::ffi::OsStr::from_bytes(b"/boot/\xffvmlinuz"));
        }
        let err = build_argv(&c, AccelChoice::Tcg, &paths(), false).unwrap_err();
        assert!(matches!(err, ArgvError::NonUtf8Path { ref field, .. } if field == "boot.kernel"));
    }
}
