//! Guest agent wire format (pure: no I/O).
//!
//! qemu-ga speaks the QMP wire format without greeting or events, one JSON object per
//! `\n`-terminated line, so lines are cut with [`LineFramer`] and classified with
//! [`parse_reply`]. What is specific to the
//! agent is the channel: it is a plain byte pipe into the guest with no connection state, so
//! it can hold a half-written command or replies nobody is waiting for. The cure is the
//! delimited sync: send `0xFF` (qemu-ga resets its JSON parser on it) followed by
//! `guest-sync-delimited` with a fresh id; qemu-ga answers with `0xFF` followed by
//! `{"return": ID}`. Everything received before that `0xFF` is junk (qemu-ga 7.2 first
//! answers a parse error for the flush byte itself), and replies after it that do not carry
//! our id are stale. [`AgentDecoder`] implements the skipping; [`is_sync_reply`] the match.
//!
//! This module also holds the base64 codec the schema's `*-b64` and `*-data` fields use. The
//! typed requests and replies of every command are in [`crate::types`].

use serde_json::{json, Map, Value};

use crate::framing::{excerpt, DecodeError, LineFramer};

/// The byte that resets qemu-ga's parser and that prefixes its `guest-sync-delimited` reply.
pub const SYNC_DELIMITER: u8 = 0xFF;

/// The longest reply line accepted by default (16 MiB). The guest controls every byte of the
/// channel, so this is the bound on what one domain's agent can make the manager buffer: a
/// longer line is a protocol error and the channel is resynced (the bytes are dropped as they
/// arrive, never kept). [`crate::GuestAgent::file_read`] asks for at most
/// [`crate::types::MAX_FILE_READ_CHUNK`] bytes at a time, whose base64 fits well within it.
pub const MAX_REPLY_LINE: usize = 16 * 1024 * 1024;

/// The `error` member of a failed command's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentErrorReply {
    /// The error class (`GenericError`, `CommandNotFound`...).
    pub class: String,
    /// qemu-ga's description.
    pub desc: String,
}

/// One message from the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentMessage {
    /// The reply to a command: `Ok` with the `return` value, or `Err` with the `error` member.
    /// `id` is the command's `id`, echoed verbatim (`None` when it had none, and for the
    /// parse error qemu-ga sends for bytes it cannot read).
    Reply {
        /// The echoed `id`.
        id: Option<Value>,
        /// The result.
        result: Result<Value, AgentErrorReply>,
    },
    /// A JSON object of no known shape (qemu-ga sends none; kept so that it is not an error).
    Unrecognized(Value),
}

/// Parses one line (without terminator) into an [`AgentMessage`]. Only bytes that are not a
/// JSON object are an error.
pub fn parse_reply(line: &[u8]) -> Result<AgentMessage, DecodeError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| DecodeError::new(format!("invalid JSON from the guest agent: {e}"), line))?;
    let Value::Object(mut obj) = value else {
        return Err(DecodeError::new(
            "guest agent message is not a JSON object",
            line,
        ));
    };
    if obj.contains_key("return") {
        let id = obj.remove("id");
        let ret = obj.remove("return").unwrap_or(Value::Null);
        return Ok(AgentMessage::Reply {
            id,
            result: Ok(ret),
        });
    }
    let error = obj.get("error").and_then(|e| {
        Some(AgentErrorReply {
            class: e.get("class")?.as_str()?.to_owned(),
            desc: e.get("desc")?.as_str()?.to_owned(),
        })
    });
    match error {
        Some(reply) => Ok(AgentMessage::Reply {
            id: obj.remove("id"),
            result: Err(reply),
        }),
        None => Ok(AgentMessage::Unrecognized(Value::Object(obj))),
    }
}

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
pub fn is_sync_reply(msg: &AgentMessage, id: u64) -> bool {
    matches!(msg, AgentMessage::Reply { result: Ok(v), .. } if v.as_u64() == Some(id))
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
    /// A decoder for a fresh connection, with the default [`MAX_REPLY_LINE`].
    pub fn new() -> Self {
        Self::with_max_line(MAX_REPLY_LINE)
    }

    /// A decoder that rejects reply lines longer than `max_line` bytes.
    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            framer: LineFramer::new(max_line),
            skipping: false,
        }
    }

    /// Bytes buffered now (bounded by the line limit plus one read).
    pub fn buffered_len(&self) -> usize {
        self.framer.buffered().len()
    }

    /// Frees a large buffer once it is empty (see [`LineFramer::release_if_empty`]).
    pub fn release_if_empty(&mut self) {
        self.framer.release_if_empty();
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
    pub fn next_message(&mut self) -> Result<Option<AgentMessage>, DecodeError> {
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
            return parse_reply(&line).map(Some);
        }
    }

    /// The start of the bytes buffered but not yet decoded (for error messages).
    pub fn buffered_excerpt(&self) -> String {
        excerpt(self.framer.buffered())
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
    use crate::types::{
        AgentInfo, FsFreezeStatus, GuestExecRequest, GuestExecStatus, GuestNetworkInterface,
    };

    /// Real bytes recorded from qemu-ga 7.2 (see tests/fixtures/README.md).
    fn transcript(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// The id the recorder used for its guest-sync-delimited requests.
    const RECORDED_SYNC_ID: u64 = 1_234_567;

    fn decode_all(dec: &mut AgentDecoder, bytes: &[u8]) -> Vec<AgentMessage> {
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
            [AgentMessage::Reply { result, .. }] => result
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
            AgentMessage::Reply { result: Err(e), .. } if e.desc.contains("JSON parse error")
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
            [AgentMessage::Reply { id: Some(id), result: Ok(_) }] if id == &json!(42)
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
