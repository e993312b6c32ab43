//! Typed requests and replies of every command of the qemu-ga schema.
//!
//! The field names are the schema's (qga/qapi-schema.json, kebab-case on the wire). Replies
//! keep the fields this crate does not know in an `extra` map where the schema has grown
//! members over time, so a newer agent is not a protocol error. Bytes the schema carries as
//! base64 (`buf-b64`, the password, exec I/O) are `Vec<u8>` here; the client encodes and
//! decodes them.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::codec::{base64_decode, base64_encode};

/// The largest `count` [`crate::GuestAgent::file_read`] asks for in one `guest-file-read`
/// (qemu-ga 7.2 allows up to 48 MiB): 8 MiB comes back as about 11 MiB of base64, within the
/// default [`crate::codec::MAX_REPLY_LINE`].
pub const MAX_FILE_READ_CHUNK: usize = 8 * 1024 * 1024;

/// Every command of the seed schema, in the schema's order: what [`crate::GuestAgent`] types.
pub const SCHEMA_COMMANDS: [&str; 29] = [
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-get-time",
    "guest-set-time",
    "guest-info",
    "guest-shutdown",
    "guest-file-open",
    "guest-file-close",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-network-get-interfaces",
    "guest-get-vcpus",
    "guest-set-vcpus",
    "guest-get-memory-blocks",
    "guest-set-memory-blocks",
    "guest-get-memory-block-info",
    "guest-get-fsinfo",
    "guest-set-user-password",
];

/// The commands that send no reply when they succeed (`success-response: false`).
pub const NO_REPLY_COMMANDS: [&str; 4] = [
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

/// One command in the `guest-info` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCommandInfo {
    /// Command name.
    pub name: String,
    /// `false` if blocked with `-b/--block-rpcs` (or not supported on this guest OS).
    pub enabled: bool,
    /// `false` for commands that send no reply on success (guest-shutdown, guest-suspend-*).
    /// Assumed `true` when an agent does not say.
    #[serde(rename = "success-response", default = "default_true")]
    pub success_response: bool,
}

fn default_true() -> bool {
    true
}

/// The reply of `guest-info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// qemu-ga's version, e.g. `7.2.22`.
    pub version: String,
    /// Every command qemu-ga knows, with whether it is enabled.
    pub supported_commands: Vec<AgentCommandInfo>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl AgentInfo {
    /// The entry for `name`, if qemu-ga knows the command.
    pub fn command(&self, name: &str) -> Option<&AgentCommandInfo> {
        self.supported_commands.iter().find(|c| c.name == name)
    }

    /// `true` if qemu-ga knows `name` and it is enabled.
    pub fn is_enabled(&self, name: &str) -> bool {
        self.command(name).is_some_and(|c| c.enabled)
    }
}

/// One IP address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIpAddress {
    /// `ipv4` or `ipv6` (kept as sent).
    #[serde(rename = "ip-address-type")]
    pub ip_address_type: String,
    /// The address in text form.
    #[serde(rename = "ip-address")]
    pub ip_address: String,
    /// The prefix length.
    pub prefix: u32,
}

/// One interface in the `guest-network-get-interfaces` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestNetworkInterface {
    /// Interface name in the guest (e.g. `eth0`).
    pub name: String,
    /// MAC address, when the interface has one.
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    /// Addresses (absent for an interface without any).
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<GuestIpAddress>,
    /// Everything else (`statistics`...), verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The reply of `guest-fsfreeze-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsFreezeStatus {
    /// Filesystems are writable.
    Thawed,
    /// Filesystems are frozen.
    Frozen,
}

/// The mode of `guest-shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Power off (qemu-ga's default).
    Powerdown,
    /// Halt without powering off.
    Halt,
    /// Reboot.
    Reboot,
}

/// The arguments of `guest-exec` (not in the seed schema's 29; kept from the client's
/// first version).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestExecRequest {
    /// Path of the program in the guest.
    pub path: String,
    /// Arguments (without argv\[0\]).
    pub args: Vec<String>,
    /// Extra environment, `NAME=value` each.
    pub env: Vec<String>,
    /// Bytes fed to the program's stdin.
    pub input: Option<Vec<u8>>,
    /// Collect stdout and stderr (returned by `guest-exec-status` once it exited).
    pub capture_output: bool,
}

impl GuestExecRequest {
    /// The `arguments` object of the command.
    pub fn to_arguments(&self) -> Value {
        let mut args = json!({ "path": self.path, "capture-output": self.capture_output });
        if !self.args.is_empty() {
            args["arg"] = json!(self.args);
        }
        if !self.env.is_empty() {
            args["env"] = json!(self.env);
        }
        if let Some(input) = &self.input {
            args["input-data"] = json!(base64_encode(input));
        }
        args
    }
}

/// The reply of `guest-exec-status`, with output already base64-decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestExecStatus {
    /// Whether the process has exited; the other fields are only meaningful once it has.
    pub exited: bool,
    /// Exit code, if it exited normally.
    pub exit_code: Option<i64>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i64>,
    /// Captured stdout.
    pub out_data: Option<Vec<u8>>,
    /// Captured stderr.
    pub err_data: Option<Vec<u8>>,
    /// qemu-ga truncated stdout (it keeps at most 16 MiB).
    pub out_truncated: bool,
    /// qemu-ga truncated stderr.
    pub err_truncated: bool,
}

impl GuestExecStatus {
    /// Interprets the raw `return` of `guest-exec-status`.
    pub fn from_reply(value: &Value) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Wire {
            exited: bool,
            exitcode: Option<i64>,
            signal: Option<i64>,
            #[serde(rename = "out-data")]
            out_data: Option<String>,
            #[serde(rename = "err-data")]
            err_data: Option<String>,
            #[serde(rename = "out-truncated", default)]
            out_truncated: bool,
            #[serde(rename = "err-truncated", default)]
            err_truncated: bool,
        }
        let wire = Wire::deserialize(value).map_err(|e| e.to_string())?;
        let decode = |field: &str, data: Option<String>| {
            data.map(|s| base64_decode(&s).map_err(|e| format!("{field}: {e}")))
                .transpose()
        };
        Ok(Self {
            exited: wire.exited,
            exit_code: wire.exitcode,
            signal: wire.signal,
            out_data: decode("out-data", wire.out_data)?,
            err_data: decode("err-data", wire.err_data)?,
            out_truncated: wire.out_truncated,
            err_truncated: wire.err_truncated,
        })
    }
}

/// Network statistics of an interface (`GuestNetworkInterfaceStat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterfaceStat {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errs: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Send errors.
    pub tx_errs: u64,
    /// Sent packets dropped.
    pub tx_dropped: u64,
}

impl GuestNetworkInterface {
    /// The interface's statistics, if the agent sent them (`statistics`).
    pub fn statistics(&self) -> Option<GuestNetworkInterfaceStat> {
        serde_json::from_value(self.extra.get("statistics")?.clone()).ok()
    }
}

/// The open mode of `guest-file-open`, as fopen(3) spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileOpenMode {
    /// `r`: read.
    #[serde(rename = "r")]
    Read,
    /// `r+`: read and write.
    #[serde(rename = "r+")]
    ReadWrite,
    /// `w`: write, truncating or creating.
    #[serde(rename = "w")]
    Write,
    /// `w+`: read and write, truncating or creating.
    #[serde(rename = "w+")]
    WriteRead,
    /// `a`: append, creating.
    #[serde(rename = "a")]
    Append,
    /// `a+`: read and append, creating.
    #[serde(rename = "a+")]
    AppendRead,
}

impl FileOpenMode {
    /// The fopen(3) mode string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "r",
            Self::ReadWrite => "r+",
            Self::Write => "w",
            Self::WriteRead => "w+",
            Self::Append => "a",
            Self::AppendRead => "a+",
        }
    }
}

/// A file handle returned by `guest-file-open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileHandle(pub i64);

/// The reply of `guest-file-read` with the data base64-decoded (`GuestFileRead`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFileRead {
    /// The bytes read.
    pub data: Vec<u8>,
    /// End of file reached.
    pub eof: bool,
}

impl GuestFileRead {
    /// Interprets the raw reply, checking `count` against the decoded bytes.
    pub fn from_reply(value: &Value) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Wire {
            count: u64,
            #[serde(rename = "buf-b64")]
            buf_b64: String,
            eof: bool,
        }
        let wire = Wire::deserialize(value).map_err(|e| e.to_string())?;
        let data = base64_decode(&wire.buf_b64).map_err(|e| format!("buf-b64: {e}"))?;
        if data.len() as u64 != wire.count {
            return Err(format!(
                "count {} but buf-b64 holds {} bytes",
                wire.count,
                data.len()
            ));
        }
        Ok(Self {
            data,
            eof: wire.eof,
        })
    }
}

/// The reply of `guest-file-write` (`GuestFileWrite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFileWrite {
    /// Bytes written.
    pub count: u64,
    /// End of file reached.
    pub eof: bool,
}

/// Where `guest-file-seek` counts from (`QGASeek`: the symbolic form of `GuestFileWhence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeekWhence {
    /// From the start of the file.
    Set,
    /// From the current position.
    Cur,
    /// From the end of the file.
    End,
}

/// The reply of `guest-file-seek` (`GuestFileSeek`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFileSeek {
    /// The new position.
    pub position: u64,
    /// End of file reached.
    pub eof: bool,
}

/// One path in the `guest-fstrim` reply (`GuestFilesystemTrimResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFilesystemTrimResult {
    /// The mount point.
    pub path: String,
    /// Bytes trimmed, when it worked.
    #[serde(default)]
    pub trimmed: Option<u64>,
    /// The minimum extent length used.
    #[serde(default)]
    pub minimum: Option<u64>,
    /// Why this path could not be trimmed (the guest's words), when it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// The reply of `guest-fstrim` (`GuestFilesystemTrimResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFilesystemTrimResponse {
    /// One entry per mounted filesystem the agent tried.
    pub paths: Vec<GuestFilesystemTrimResult>,
}

/// One logical CPU (`GuestLogicalProcessor`), in the reply of `guest-get-vcpus` and the
/// request of `guest-set-vcpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestLogicalProcessor {
    /// The guest's CPU number.
    pub logical_id: i64,
    /// Online.
    pub online: bool,
    /// Can be taken offline (in replies; ignored in requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// One memory block (`GuestMemoryBlock`), in the reply of `guest-get-memory-blocks` and the
/// request of `guest-set-memory-blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlock {
    /// The block's index (`/sys/devices/system/memory/memoryN`).
    pub phys_index: u64,
    /// Online.
    pub online: bool,
    /// Can be taken offline (in replies; ignored in requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_offline: Option<bool>,
}

/// The outcome for one block of `guest-set-memory-blocks` (`GuestMemoryBlockResponseType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestMemoryBlockResponseType {
    /// Done.
    Success,
    /// No such block.
    NotFound,
    /// The block cannot change state.
    OperationNotSupported,
    /// The change failed (`error_code` says why).
    OperationFailed,
}

/// One entry of the `guest-set-memory-blocks` reply (`GuestMemoryBlockResponse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestMemoryBlockResponse {
    /// The block.
    pub phys_index: u64,
    /// What happened.
    pub response: GuestMemoryBlockResponseType,
    /// The guest's errno, for `operation-failed`.
    #[serde(default)]
    pub error_code: Option<i64>,
}

/// The reply of `guest-get-memory-block-info` (`GuestMemoryBlockInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemoryBlockInfo {
    /// The size of one memory block, in bytes.
    pub size: u64,
}

/// A PCI address (`GuestPCIAddress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPciAddress {
    /// PCI domain.
    pub domain: i64,
    /// Bus.
    pub bus: i64,
    /// Slot.
    pub slot: i64,
    /// Function.
    pub function: i64,
}

/// The disk under a filesystem (`GuestDiskAddress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestDiskAddress {
    /// The controller's PCI address.
    pub pci_controller: GuestPciAddress,
    /// `ide`, `scsi`, `virtio`, `unknown`... (kept as sent).
    pub bus_type: String,
    /// Bus number.
    pub bus: i64,
    /// Target.
    pub target: i64,
    /// Unit.
    pub unit: i64,
    /// The disk's serial, if known.
    #[serde(default)]
    pub serial: Option<String>,
    /// The device node, if known.
    #[serde(default)]
    pub dev: Option<String>,
    /// Fields this crate does not know (`ccw-address`...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One mounted filesystem in the `guest-get-fsinfo` reply (`GuestFilesystemInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFilesystemInfo {
    /// The device name in the guest (e.g. `vda1`).
    pub name: String,
    /// Where it is mounted.
    pub mountpoint: String,
    /// The filesystem type (`ext4`...).
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes used, if the agent could stat it.
    #[serde(default)]
    pub used_bytes: Option<u64>,
    /// Total bytes, if the agent could stat it.
    #[serde(default)]
    pub total_bytes: Option<u64>,
    /// The disks under it (empty for a virtual filesystem).
    #[serde(default)]
    pub disk: Vec<GuestDiskAddress>,
}

/// The arguments of `guest-set-user-password`. Its `Debug` output hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SetUserPassword {
    /// The account.
    pub username: String,
    /// The password, raw (sent base64-encoded as the schema requires).
    pub password: Vec<u8>,
    /// `password` is already crypt(3)-hashed.
    pub crypted: bool,
}

impl std::fmt::Debug for SetUserPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetUserPassword")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("crypted", &self.crypted)
            .finish()
    }
}

impl SetUserPassword {
    /// The `arguments` object of the command.
    pub fn to_arguments(&self) -> Value {
        json!({
            "username": self.username,
            "password": base64_encode(&self.password),
            "crypted": self.crypted,
        })
    }
}
