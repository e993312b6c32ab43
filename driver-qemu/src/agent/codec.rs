//! Guest agent wire format (pure: no I/O).
//!
//! qemu-ga speaks the QMP wire format without greeting or events, one JSON object per
//! `\n`-terminated line, so lines are cut with [`LineFramer`] and classified with
//! [`qmp::codec::parse_message`](crate::qmp::codec::parse_message). What is specific to the
//! agent is the channel: it is a plain byte pipe into the guest with no connection state, so
//! it can hold a half-written command or replies nobody is waiting for. The cure is the
//! delimited sync: send `0xFF` (qemu-ga resets its JSON parser on it) followed by
//! `guest-sync-delimited` with a fresh id; qemu-ga answers with `0xFF` followed by
//! `{"return": ID}`. Everything received before that `0xFF` is junk (qemu-ga 7.2 first
//! answers a parse error for the flush byte itself), and replies after it that do not carry
//! our id are stale. [`AgentDecoder`] implements the skipping; [`is_sync_reply`] the match.
//!
//! This module also holds the typed replies of the commands domkit uses, and the base64
//! codec that `guest-exec` and `guest-exec-status` need.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::qmp::codec::{excerpt, parse_message, DecodeError, LineFramer, QmpMessage};

/// The byte that resets qemu-ga's parser and that prefixes its `guest-sync-delimited` reply.
pub const SYNC_DELIMITER: u8 = 0xFF;

/// The longest accepted reply line. `guest-file-read` of the maximum 48 MiB comes back
/// base64-encoded (64 MiB); anything longer is not qemu-ga.
pub const MAX_REPLY_LINE: usize = 80 * 1024 * 1024;

/// Serialises a command, newline-terminated. `id` is echoed by qemu-ga (7.2 does), which lets
/// the client recognise a stale reply.
pub fn encode_command(name: &str, arguments: Option<&Value>, id: Option<u64>) -> Vec<u8> {
    let mut cmd = Map::new();
    cmd.insert("execute".into(), Value::String(name.to_owned()));
    if let Some(args) = arguments {
        cmd.insert("arguments".into(), args.clone());
    }
    if let Some(id) = id {
        cmd.insert("id".into(), Value::from(id));
    }
    let mut out = Value::Object(cmd).to_string().into_bytes();
    out.push(b'\n');
    out
}

/// The resync request: the flush byte, then `guest-sync-delimited` with `id`.
pub fn encode_sync_delimited(id: u64) -> Vec<u8> {
    let mut out = vec![SYNC_DELIMITER];
    out.extend_from_slice(&encode_command(
        "guest-sync-delimited",
        Some(&json!({ "id": id })),
        None,
    ));
    out
}

/// `true` if `msg` is the reply to the `guest-sync-delimited` with `id`.
pub fn is_sync_reply(msg: &QmpMessage, id: u64) -> bool {
    matches!(msg, QmpMessage::Reply { result: Ok(v), .. } if v.as_u64() == Some(id))
}

/// Cuts the agent byte stream into messages, and skips junk during a resync.
#[derive(Debug)]
pub struct AgentDecoder {
    framer: LineFramer,
    /// Dropping bytes until the next [`SYNC_DELIMITER`].
    skipping: bool,
}

impl Default for AgentDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentDecoder {
    /// A decoder for a fresh connection.
    pub fn new() -> Self {
        Self {
            framer: LineFramer::new(MAX_REPLY_LINE),
            skipping: false,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// Starts a resync: every byte up to and including the next [`SYNC_DELIMITER`] (already
    /// buffered or still to come) is dropped. Call it right before sending
    /// [`encode_sync_delimited`].
    pub fn start_resync(&mut self) {
        self.skipping = true;
    }

    /// `true` while bytes are being skipped up to a delimiter.
    pub fn is_resyncing(&self) -> bool {
        self.skipping
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// A line is cut after its last delimiter byte: qemu-ga writes `0xFF` only in front of a
    /// `guest-sync-delimited` reply (it never occurs in the UTF-8 JSON qemu-ga writes), so
    /// whatever precedes it on the line is junk, such as the unterminated start of a reply
    /// cut short when the agent restarted. (A late reply to an earlier sync starts with one.)
    /// Bytes that are not JSON are an error: the caller should resync.
    pub fn next_message(&mut self) -> Result<Option<QmpMessage>, DecodeError> {
        loop {
            if self.skipping {
                if !self.framer.discard_through(SYNC_DELIMITER) {
                    return Ok(None);
                }
                self.skipping = false;
            }
            let line = self
                .framer
                .next_line()
                .map_err(|e| DecodeError::new(e.to_string(), self.framer.buffered()))?;
            let Some(mut line) = line else {
                return Ok(None);
            };
            if let Some(last) = line.iter().rposition(|&b| b == SYNC_DELIMITER) {
                line.drain(..=last);
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse_message(&line).map(Some);
        }
    }

    /// The start of the bytes buffered but not yet decoded (for error messages).
    pub fn buffered_excerpt(&self) -> String {
        excerpt(self.framer.buffered())
    }
}

// ------------------------------------------------------------------------------------------
// Typed replies
// ------------------------------------------------------------------------------------------

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

/// The arguments of `guest-exec`.
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

// ------------------------------------------------------------------------------------------
// Base64 (RFC 4648, standard alphabet, padded), as GLib's g_base64_* in qemu-ga.
// ------------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes bytes as padded standard base64.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes padded (or unpadded) standard base64; line breaks are ignored.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut padding = 0usize;
    for (pos, c) in text.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                padding += 1;
                continue;
            }
            b'\n' | b'\r' => continue,
            _ => return Err(format!("invalid base64 byte 0x{c:02x} at {pos}")),
        };
        if padding > 0 {
            return Err(format!("base64 data after padding at {pos}"));
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // 6 leftover bits means one stray character: not valid base64.
    if bits >= 6 || padding > 2 {
        return Err("truncated base64".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real bytes recorded from qemu-ga 7.2 (see tests/fixtures/transcripts/README.md).
    fn transcript(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/transcripts/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// The id the recorder used for its guest-sync-delimited requests.
    const RECORDED_SYNC_ID: u64 = 1_234_567;

    fn decode_all(dec: &mut AgentDecoder, bytes: &[u8]) -> Vec<QmpMessage> {
        dec.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = dec.next_message().expect("decodes") {
            out.push(m);
        }
        out
    }

    fn single_reply(name: &str) -> Result<Value, (String, String)> {
        let msgs = decode_all(&mut AgentDecoder::new(), &transcript(name));
        match msgs.as_slice() {
            [QmpMessage::Reply { result, .. }] => result
                .clone()
                .map_err(|e| (e.class.clone(), e.desc.clone())),
            other => panic!("{name}: expected one reply, got {other:?}"),
        }
    }

    #[test]
    fn dirty_channel_resync_skips_to_delimiter_and_finds_our_id() {
        // Recorded: a truncated command, garbage, a stale ping reply, then 0xFF + sync.
        let bytes = transcript("agent-dirty-resync.raw");
        assert!(bytes.contains(&SYNC_DELIMITER));
        let mut dec = AgentDecoder::new();
        dec.start_resync();
        let msgs = decode_all(&mut dec, &bytes);
        assert!(!dec.is_resyncing());
        let last = msgs.last().expect("a message after the delimiter");
        assert!(is_sync_reply(last, RECORDED_SYNC_ID), "{msgs:?}");

        // Without skipping, the junk before the delimiter is visible: the parse error qemu-ga
        // 7.2 sends for the flush byte.
        let msgs = decode_all(&mut AgentDecoder::new(), &bytes);
        assert!(msgs.iter().any(|m| matches!(
            m,
            QmpMessage::Reply { result: Err(e), .. } if e.desc.contains("JSON parse error")
        )));
        assert!(msgs.iter().any(|m| is_sync_reply(m, RECORDED_SYNC_ID)));
    }

    #[test]
    fn resync_works_when_bytes_arrive_one_at_a_time() {
        let bytes = transcript("agent-dirty-resync.raw");
        let mut dec = AgentDecoder::new();
        dec.start_resync();
        let mut found = false;
        for b in &bytes {
            dec.push(std::slice::from_ref(b));
            while let Some(m) = dec.next_message().expect("decodes") {
                found |= is_sync_reply(&m, RECORDED_SYNC_ID);
            }
        }
        assert!(found);
    }

    #[test]
    fn stale_sync_reply_is_not_ours() {
        // A late answer to an earlier sync (id 1) arrives before ours (id 2).
        let mut dec = AgentDecoder::new();
        dec.start_resync();
        let msgs = decode_all(
            &mut dec,
            b"{\"return\": {}}\n\xff{\"return\": 1}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\n\xff{\"return\": 2}\n",
        );
        let ours: Vec<bool> = msgs.iter().map(|m| is_sync_reply(m, 2)).collect();
        assert_eq!(ours, vec![false, false, true]);
    }

    /// Fuzz finding (tests/fuzz_codecs.rs, agent_resync): junk without a newline after an
    /// earlier delimiter (here `J`; in real life the start of a reply cut short when qemu-ga
    /// restarted) ran into our `0xFF{"return": ID}` line. Only the 0xFF was removed, the line
    /// `J{"return": ...}` failed to parse, and the resync that followed waited for a delimiter
    /// that never came: the reply was lost.
    #[test]
    fn resync_finds_reply_after_unterminated_junk_following_an_earlier_delimiter() {
        for (bytes, id) in [
            (
                &b"\xffJ\xff{\"return\": 231275785753688}\n"[..],
                231_275_785_753_688,
            ),
            (b"\xff{\"return\": {\"host-na\xff{\"return\": 7}\n", 7),
        ] {
            for chunk in [bytes.len(), 1] {
                let mut dec = AgentDecoder::new();
                dec.start_resync();
                let mut found = false;
                for part in bytes.chunks(chunk) {
                    dec.push(part);
                    loop {
                        match dec.next_message() {
                            Ok(Some(m)) => found |= is_sync_reply(&m, id),
                            Ok(None) => break,
                            Err(_) => dec.start_resync(), // what the client does
                        }
                    }
                }
                assert!(found, "{}", bytes.escape_ascii());
            }
        }
        // Outside a resync too: what precedes a delimiter on a line is junk, not an error.
        let msgs = decode_all(&mut AgentDecoder::new(), b"half a rep\xff{\"return\": 5}\n");
        assert!(
            matches!(msgs.as_slice(), [m] if is_sync_reply(m, 5)),
            "{msgs:?}"
        );
    }

    #[test]
    fn recorded_replies_parse_into_typed_values() {
        assert_eq!(single_reply("agent-ping.raw"), Ok(json!({})));
        let time = single_reply("agent-get-time.raw").expect("time");
        assert!(time
            .as_i64()
            .is_some_and(|ns| ns > 1_600_000_000_000_000_000));

        let info: AgentInfo =
            serde_json::from_value(single_reply("agent-info.raw").expect("info")).expect("typed");
        assert!(info.version.starts_with("7.2"));
        assert!(info.is_enabled("guest-ping"));
        assert!(!info.is_enabled("guest-shutdown"));
        let shutdown = info.command("guest-shutdown").expect("known");
        assert!(!shutdown.success_response);

        let ifaces: Vec<GuestNetworkInterface> =
            serde_json::from_value(single_reply("agent-network.raw").expect("net")).expect("typed");
        let lo = ifaces.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.ip_addresses.iter().any(|a| a.ip_address == "127.0.0.1"));
        assert!(lo.extra.contains_key("statistics"));

        let status: FsFreezeStatus =
            serde_json::from_value(single_reply("agent-fsfreeze-status.raw").expect("fs"))
                .expect("typed");
        assert_eq!(status, FsFreezeStatus::Thawed);
    }

    #[test]
    fn recorded_errors_keep_class_and_desc() {
        let (class, desc) = single_reply("agent-blocked.raw").expect_err("blocked");
        assert_eq!(class, "CommandNotFound");
        assert!(desc.contains("has been disabled"), "{desc}");
        let (class, desc) = single_reply("agent-not-found.raw").expect_err("unknown");
        assert_eq!(class, "CommandNotFound");
        assert!(desc.contains("has not been found"), "{desc}");
    }

    #[test]
    fn echoed_id_is_kept() {
        let msgs = decode_all(&mut AgentDecoder::new(), &transcript("agent-ping-id.raw"));
        assert!(matches!(
            msgs.as_slice(),
            [QmpMessage::Reply { id: Some(id), result: Ok(_) }] if id == &json!(42)
        ));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut dec = AgentDecoder::new();
        dec.push(b"this is not json\n");
        let err = dec.next_message().expect_err("garbage");
        assert!(err.excerpt.contains("not json"));
    }

    #[test]
    fn encodings() {
        assert_eq!(
            encode_command("guest-ping", None, Some(7)),
            b"{\"execute\":\"guest-ping\",\"id\":7}\n"
        );
        let sync = encode_sync_delimited(99);
        assert_eq!(sync[0], SYNC_DELIMITER);
        let v: Value = serde_json::from_slice(&sync[1..]).expect("json");
        assert_eq!(
            v,
            json!({"execute": "guest-sync-delimited", "arguments": {"id": 99}})
        );
        let exec = GuestExecRequest {
            path: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi".into()],
            input: Some(b"in".to_vec()),
            capture_output: true,
            ..Default::default()
        };
        assert_eq!(
            exec.to_arguments(),
            json!({"path": "/bin/sh", "arg": ["-c", "echo hi"], "input-data": "aW4=",
                   "capture-output": true})
        );
    }

    #[test]
    fn exec_status_decodes_output() {
        // Synthetic (guest-exec is blocked on the host agent): the documented 7.2 shape.
        let v = json!({"exited": true, "exitcode": 0, "out-data": "aGVsbG8K",
                       "err-data": "", "future-field": 1});
        let s = GuestExecStatus::from_reply(&v).expect("parses");
        assert!(s.exited);
        assert_eq!(s.exit_code, Some(0));
        assert_eq!(s.out_data.as_deref(), Some(b"hello\n".as_slice()));
        assert_eq!(s.err_data.as_deref(), Some(b"".as_slice()));
        assert!(GuestExecStatus::from_reply(&json!({"exited": false}))
            .expect("running")
            .out_data
            .is_none());
        assert!(GuestExecStatus::from_reply(&json!({"exited": true, "out-data": "!!"})).is_err());
    }

    #[test]
    fn base64_rfc4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (raw, enc) in vectors {
            assert_eq!(base64_encode(raw), enc);
            assert_eq!(base64_decode(enc).expect("decodes"), raw);
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).expect("rt"), all);
        assert!(base64_decode("Zm9v!").is_err());
        assert!(base64_decode("Z").is_err());
        assert!(base64_decode("Zg==Zg").is_err());
    }
}
