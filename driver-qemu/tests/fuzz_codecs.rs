//! Fuzz/property harness for the bytes a buggy QEMU or a hostile guest controls: the QMP line
//! framer and message parser, the guest agent decoder with its 0xFF resync, and the QEMU save
//! file header parser. Stable Rust, no dependency: a seeded mutation loop
//! (tests/fuzz/mod.rs) over the recorded QEMU 7.2 / qemu-ga 7.2 transcripts, with bit
//! flips, truncation, inserted 0xFF and NUL bytes, invalid UTF-8, deep JSON nesting (up to
//! 100k), huge numbers (1e999999, 2^200), lines over the framer limit, and every input pushed
//! in random chunk sizes.
//!
//! Properties: nothing panics; nothing hangs (every decode loop is bounded by the newlines
//! pushed) or goes quadratic (`LineFramer::bytes_moved` <= bytes pushed); buffered bytes stay
//! within the framer limit (+ 1 for a pending `\r`) + one chunk; results do not depend on
//! chunking; errors are typed (`LineTooLong`, `DecodeError`, `SaveFileError`); a reply after
//! garbage + 0xFF is found by a resync; parsed headers re-encode to themselves.
//!
//! `DOMKIT_FUZZ_CASES` sets the cases per target (default `fuzz::DEFAULT_CASES`),
//! `DOMKIT_FUZZ_SEED` varies the seeds. A long run:
//! `DOMKIT_FUZZ_CASES=5000000 cargo test -p domkit-qemu --test fuzz_codecs --release -- --nocapture`.
//! A failure prints the minimised input as a byte-string literal; each finding so far is a
//! regression test at the end of this file.

#[macro_use]
mod fuzz;

use domkit_core::DomainId;
use domkit_qemu::agent::codec::{
    is_sync_reply, AgentDecoder, AgentMessage, MAX_REPLY_LINE, SYNC_DELIMITER,
};
use domkit_qemu::qmp::codec::{
    excerpt, parse_message, LineFramer, LineTooLong, QmpMessage, DEFAULT_MAX_LINE,
};
use domkit_qemu::savefile::{
    encode_header, parse_header, SaveFileError, SaveHeader, DIGEST_LINE_LEN, FORMAT_VERSION, MAGIC,
    MAX_HEADER_LEN,
};
use fuzz::{chunk_sizes, concat_seeds, mutate, Outcome, Rng, Shape};
use serde_json::Value;

/// Salts so that a property's own random choices differ from its generator's.
const SALT_LIMIT: u64 = 0x006c_696d_6974;
const SALT_CHUNKS: u64 = 0x6368_756e_6b73;

fn newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

// ------------------------------------------------------------------------------------------
// 1. QMP line framer
// ------------------------------------------------------------------------------------------

/// The framer limit of a case: mostly small, so that lines over it are common.
fn framer_limit(seed: u64) -> usize {
    *Rng::new(seed ^ SALT_LIMIT).pick(&[
        0,
        1,
        2,
        3,
        8,
        16,
        40,
        64,
        100,
        160,
        512,
        4096,
        DEFAULT_MAX_LINE,
        DEFAULT_MAX_LINE,
    ])
}

/// A partial line (no newline yet) that can no longer become a line within `max`: even if
/// its last byte is the `\r` of a `\r\n`, what remains is too long.
fn doomed(partial: &[u8], max: usize) -> bool {
    partial.len() > max.saturating_add(1)
        || (partial.len() == max.saturating_add(1) && partial.last() != Some(&b'\r'))
}

/// What the framer must produce for `input` pushed at once: the lines, then either the
/// partial line left buffered or `Err` (a line over `max`).
fn model_lines(input: &[u8], max: usize) -> (Vec<Vec<u8>>, Result<Vec<u8>, ()>) {
    let mut lines = Vec::new();
    let mut rest = input;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let raw = &rest[..nl];
        rest = &rest[nl + 1..];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() > max {
            return (lines, Err(()));
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            lines.push(line.to_vec());
        }
    }
    if doomed(rest, max) {
        (lines, Err(()))
    } else {
        (lines, Ok(rest.to_vec()))
    }
}

fn framer_property(input: &[u8], seed: u64) -> Outcome {
    let max = framer_limit(seed);
    let mut rng = Rng::new(seed ^ SALT_CHUNKS);
    let sizes = chunk_sizes(&mut rng, input.len());
    let mut framer = LineFramer::new(max);
    let mut lines = Vec::new();
    let mut too_long = false;
    let (mut pushed, mut seen_newlines, mut calls) = (0usize, 0usize, 0usize);
    'feed: for &size in &sizes {
        let part = &input[pushed..pushed + size];
        let before = framer.buffered().len();
        framer.push(part);
        pushed += size;
        seen_newlines += newlines(part);
        ensure!(
            framer.buffered().len() == before + size,
            "push of {size} bytes buffered {} -> {}",
            before,
            framer.buffered().len()
        );
        ensure!(
            framer.buffered().len() <= max.saturating_add(1).saturating_add(size),
            "{} bytes buffered: over the limit {max} + 1 + one chunk of {size}",
            framer.buffered().len()
        );
        loop {
            calls += 1;
            ensure!(
                calls <= seen_newlines + sizes.len() + 1,
                "next_line called {calls} times for {seen_newlines} newlines: not converging"
            );
            match framer.next_line() {
                Ok(Some(line)) => {
                    ensure!(!line.contains(&b'\n'), "line contains a newline");
                    ensure!(line.len() <= max, "line of {} bytes > {max}", line.len());
                    ensure!(
                        !line.iter().all(u8::is_ascii_whitespace),
                        "blank line returned"
                    );
                    lines.push(line);
                    ensure!(lines.len() <= seen_newlines, "more lines than newlines");
                }
                Ok(None) => {
                    // O(1) checks only: a scan per push would make this loop quadratic.
                    // What is buffered is compared with the model at the end.
                    ensure!(
                        framer.buffered().len() <= max.saturating_add(1),
                        "{} bytes buffered after Ok(None), limit {max}",
                        framer.buffered().len()
                    );
                    break;
                }
                Err(e) => {
                    ensure!(e == LineTooLong { limit: max }, "wrong error {e:?}");
                    too_long = true;
                    break 'feed;
                }
            }
        }
    }
    ensure!(
        framer.bytes_moved() <= pushed as u64,
        "{} bytes moved for {pushed} pushed: not linear",
        framer.bytes_moved()
    );
    let (want_lines, want_end) = model_lines(input, max);
    ensure!(
        lines == want_lines,
        "lines differ from the whole-input model ({} vs {}) with chunks {sizes:?}",
        lines.len(),
        want_lines.len()
    );
    match want_end {
        Err(()) => ensure!(too_long, "model says too long, framer did not"),
        Ok(partial) => {
            ensure!(
                !too_long,
                "framer said too long, model did not (chunks {sizes:?})"
            );
            ensure!(framer.buffered() == partial, "partial line differs");
        }
    }
    Ok(())
}

#[test]
fn fuzz_qmp_framer() {
    let mut corpus = fuzz::transcripts("qmp-");
    corpus.extend(fuzz::transcripts("agent-"));
    corpus.extend(fuzz::flow_event_lines());
    fuzz::run(
        "qmp_framer",
        fuzz::cases(),
        |rng, seed| {
            let mut input = concat_seeds(rng, &corpus, 3);
            let shape = Shape {
                long_line: framer_limit(seed),
            };
            mutate(rng, &mut input, &corpus, shape);
            input
        },
        framer_property,
    );
}

// ------------------------------------------------------------------------------------------
// 2. QMP message parser
// ------------------------------------------------------------------------------------------

/// The classification `parse_message` must make of a JSON object.
fn expected_message(obj: &serde_json::Map<String, Value>) -> Option<QmpMessage> {
    let id = obj.get("id").cloned();
    if obj.contains_key("QMP") {
        return None; // Greeting or Unrecognized: checked by the caller.
    }
    if let Some(ret) = obj.get("return") {
        return Some(QmpMessage::Reply {
            id,
            result: Ok(ret.clone()),
        });
    }
    if let Some(err) = obj.get("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        return Some(match (class, desc) {
            (Some(class), Some(desc)) => QmpMessage::Reply {
                id,
                result: Err(domkit_qemu::qmp::codec::QmpErrorReply {
                    class: class.to_owned(),
                    desc: desc.to_owned(),
                }),
            },
            _ => QmpMessage::Unrecognized(Value::Object(obj.clone())),
        });
    }
    if let Some(Value::String(_)) = obj.get("event") {
        return None; // Event: checked by the caller.
    }
    Some(QmpMessage::Unrecognized(Value::Object(obj.clone())))
}

fn parse_property(line: &[u8], _seed: u64) -> Outcome {
    let oracle = serde_json::from_slice::<Value>(line);
    let got = parse_message(line);
    match (oracle, got) {
        (Ok(Value::Object(obj)), Ok(msg)) => match expected_message(&obj) {
            Some(want) => ensure!(msg == want, "classified {msg:?}, want {want:?}"),
            None if obj.contains_key("QMP") => ensure!(
                matches!(msg, QmpMessage::Greeting(_))
                    || msg == QmpMessage::Unrecognized(Value::Object(obj.clone())),
                "QMP key classified as {msg:?}"
            ),
            None => {
                let QmpMessage::Event(ev) = &msg else {
                    return Err(format!("event classified as {msg:?}"));
                };
                ensure!(
                    obj["event"].as_str() == Some(ev.name.as_str()),
                    "event name {:?} differs",
                    ev.name
                );
                ensure!(
                    ev.data == obj.get("data").cloned().unwrap_or(Value::Null),
                    "event data differs"
                );
            }
        },
        (Ok(Value::Object(_)), Err(e)) => return Err(format!("JSON object rejected: {e}")),
        (Ok(_), Ok(msg)) => return Err(format!("non-object accepted as {msg:?}")),
        (Err(_), Ok(msg)) => return Err(format!("invalid JSON accepted as {msg:?}")),
        (_, Err(e)) => {
            ensure!(!e.message.is_empty(), "empty error message");
            ensure!(
                e.excerpt == excerpt(line),
                "excerpt is not the line's start"
            );
            ensure!(e.excerpt.len() <= 4 * 160 + 3, "excerpt too long");
            let _ = e.to_string();
        }
    }
    Ok(())
}

#[test]
fn fuzz_qmp_parse_message() {
    let mut streams = fuzz::transcripts("qmp-");
    streams.extend(fuzz::flow_event_lines());
    let corpus = fuzz::lines_of(&streams);
    fuzz::run(
        "qmp_parse_message",
        fuzz::cases(),
        |rng, _| {
            let mut line = rng.pick(&corpus).clone();
            mutate(rng, &mut line, &corpus, Shape { long_line: 0 });
            line
        },
        parse_property,
    );
}

// ------------------------------------------------------------------------------------------
// 3. Guest agent decoder
// ------------------------------------------------------------------------------------------

/// What the client sees from the decoder, as it would act on it: an error makes it resync.
#[derive(Debug, PartialEq)]
enum Seen {
    Message(AgentMessage),
    Error(String),
}

/// Feeds `input` in `sizes` chunks to a decoder driven like `GuestAgent` drives it (a
/// decode error starts a resync), checking that every loop ends.
fn decode_like_the_client(
    input: &[u8],
    sizes: &[usize],
    resync_first: bool,
) -> Result<Vec<Seen>, String> {
    let mut dec = AgentDecoder::new();
    if resync_first {
        dec.start_resync();
    }
    let mut seen = Vec::new();
    let (mut pushed, mut seen_newlines) = (0usize, 0usize);
    for &size in sizes {
        let part = &input[pushed..pushed + size];
        dec.push(part);
        pushed += size;
        seen_newlines += newlines(part);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => seen.push(Seen::Message(msg)),
                Ok(None) => break,
                Err(e) => {
                    ensure!(!e.message.is_empty(), "empty error message");
                    let _ = e.to_string();
                    seen.push(Seen::Error(e.message));
                    dec.start_resync();
                }
            }
            // Each message or parse error consumes a newline-terminated line.
            ensure!(
                seen.len() <= seen_newlines,
                "{} results from {seen_newlines} newlines: not converging",
                seen.len()
            );
        }
    }
    let _ = dec.buffered_excerpt();
    Ok(seen)
}

fn agent_property(input: &[u8], seed: u64) -> Outcome {
    let mut rng = Rng::new(seed ^ SALT_CHUNKS);
    let resync_first = rng.one_in(2);
    let sizes = chunk_sizes(&mut rng, input.len());
    let whole = decode_like_the_client(input, &[input.len()], resync_first)?;
    let chunked = decode_like_the_client(input, &sizes, resync_first)?;
    ensure!(
        whole == chunked,
        "results depend on chunking ({} vs {} results, chunks {sizes:?})",
        whole.len(),
        chunked.len()
    );
    Ok(())
}

fn agent_corpus() -> Vec<Vec<u8>> {
    let mut corpus = fuzz::transcripts("agent-");
    corpus.extend(fuzz::transcripts("qmp-"));
    corpus.push(b"\xff{\"return\": 7}\n".to_vec());
    corpus.push(b"\xff{\"return\": 7}\n{\"return\": {}, \"id\": 8}\n".to_vec());
    corpus
}

#[test]
fn fuzz_agent_decoder() {
    let corpus = agent_corpus();
    fuzz::run(
        "agent_decoder",
        fuzz::cases(),
        |rng, _| {
            let mut input = concat_seeds(rng, &corpus, 4);
            mutate(rng, &mut input, &corpus, Shape { long_line: 0 });
            input
        },
        agent_property,
    );
}

/// The reply qemu-ga sends to `guest-sync-delimited` with `id`.
fn sync_reply(id: u64) -> Vec<u8> {
    let mut reply = vec![SYNC_DELIMITER];
    reply.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
    reply
}

fn sync_id(seed: u64) -> u64 {
    Rng::new(seed).next_u64() >> 16
}

/// Garbage, then 0xFF + the sync reply, then maybe more: a client that resyncs (and resyncs
/// again on every decode error) must find its reply. Inputs without the reply (the minimiser
/// makes them) pass trivially.
fn resync_property(input: &[u8], seed: u64) -> Outcome {
    let id = sync_id(seed);
    let reply = sync_reply(id);
    if !input.windows(reply.len()).any(|w| w == reply.as_slice()) {
        return Ok(());
    }
    let mut rng = Rng::new(seed ^ SALT_CHUNKS);
    let sizes = chunk_sizes(&mut rng, input.len());
    let seen = decode_like_the_client(input, &sizes, true)?;
    ensure!(
        seen.iter()
            .any(|s| matches!(s, Seen::Message(m) if is_sync_reply(m, id))),
        "sync reply {id} not found; saw {seen:?}"
    );
    Ok(())
}

#[test]
fn fuzz_agent_resync() {
    let corpus = agent_corpus();
    fuzz::run(
        "agent_resync",
        fuzz::cases(),
        |rng, seed| {
            let mut input = match rng.below(4) {
                0 => Vec::new(),
                1 => (0..rng.range(1, 512)).map(|_| rng.byte()).collect(),
                _ => concat_seeds(rng, &corpus, 3),
            };
            mutate(rng, &mut input, &corpus, Shape { long_line: 0 });
            input.extend_from_slice(&sync_reply(sync_id(seed)));
            if rng.one_in(3) {
                let more: &Vec<u8> = rng.pick(&corpus);
                input.extend_from_slice(more);
            }
            input
        },
        resync_property,
    );
}

// ------------------------------------------------------------------------------------------
// 4. Save file headers
// ------------------------------------------------------------------------------------------

fn random_text(rng: &mut Rng) -> String {
    let pieces = [
        "web1", "é", "\"", "\\", "\n", "\u{0}", "💾", " ", "-", "\u{fffd}", "a",
    ];
    (0..rng.range(0, 12)).map(|_| *rng.pick(&pieces)).collect()
}

fn random_header(rng: &mut Rng) -> SaveHeader {
    SaveHeader {
        format: FORMAT_VERSION,
        devices: None,
        backend: if rng.one_in(8) {
            random_text(rng)
        } else {
            "qemu".into()
        },
        domain: DomainId {
            name: random_text(rng),
            uuid: uuid::Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()),
        },
        was_paused: rng.one_in(2),
        qemu_version: random_text(rng),
        memory_mib: {
            let any = rng.next_u64();
            *rng.pick(&[0, 1, 128, 4096, u64::MAX, any])
        },
    }
}

fn savefile_property(input: &[u8], _seed: u64) -> Outcome {
    let magic_line = [MAGIC.as_bytes(), b"\n"].concat();
    match parse_header(input) {
        Ok((header, offset)) => {
            ensure!(offset <= input.len(), "offset {offset} past the end");
            ensure!(input.starts_with(&magic_line), "accepted without the magic");
            ensure!(
                input[offset - 1] == b'\n',
                "header does not end in a newline"
            );
            ensure!(
                offset - magic_line.len() <= MAX_HEADER_LEN,
                "header of {offset} bytes accepted"
            );
            ensure!(header.format <= FORMAT_VERSION, "format {}", header.format);
            let again = encode_header(&header);
            ensure!(
                parse_header(&again) == Ok((header.clone(), again.len())),
                "re-encoded header does not parse back"
            );
        }
        Err(e) => {
            let _ = e.to_string();
            let in_magic = !input.is_empty() && magic_line.starts_with(input);
            match e {
                SaveFileError::NotASaveFile => ensure!(
                    !in_magic && !input.starts_with(&magic_line),
                    "a magic prefix called not a save file"
                ),
                SaveFileError::Truncated => {
                    let rest = input.strip_prefix(magic_line.as_slice());
                    // No JSON line within the limit, or the digest line after it cut short.
                    let cut = rest.is_some_and(|r| {
                        match r[..r.len().min(MAX_HEADER_LEN)]
                            .iter()
                            .position(|&b| b == b'\n')
                        {
                            None => true,
                            Some(nl) => r.len() - (nl + 1) < DIGEST_LINE_LEN,
                        }
                    });
                    ensure!(
                        in_magic || cut,
                        "called truncated, yet it has a whole header"
                    );
                }
                SaveFileError::Malformed(why) => {
                    ensure!(input.starts_with(&magic_line), "malformed without magic");
                    ensure!(!why.is_empty(), "empty reason");
                }
                SaveFileError::UnsupportedFormat(f) => {
                    ensure!(f > FORMAT_VERSION, "format {f} called unsupported")
                }
                SaveFileError::NoDigest(f) => {
                    ensure!(f < FORMAT_VERSION, "format {f} called digest-less")
                }
                SaveFileError::Damaged(_) => {
                    ensure!(
                        false,
                        "parse_header reads no stream, so it cannot call one damaged"
                    )
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_savefile_header() {
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut rng = Rng::new(1);
    for _ in 0..32 {
        let mut bytes = encode_header(&random_header(&mut rng));
        bytes.extend_from_slice(b"QEVM\x00\x00\x00\x03\x01\x00\x00\x00\n{\"not\": json}");
        corpus.push(bytes);
    }
    fuzz::run(
        "savefile_header",
        fuzz::cases(),
        |rng, _| {
            let mut input = encode_header(&random_header(rng));
            if rng.one_in(2) {
                input.extend_from_slice(b"QEVM\x00\x00\x00\x03");
                input.extend((0..rng.range(0, 64)).map(|_| rng.byte()));
            }
            let shape = Shape {
                long_line: MAX_HEADER_LEN,
            };
            mutate(rng, &mut input, &corpus, shape);
            input
        },
        savefile_property,
    );
}

// ------------------------------------------------------------------------------------------
// Fixed cases: what the loop makes too rarely, and regression tests for findings
// ------------------------------------------------------------------------------------------

/// 100k `[`, numbers no f64 holds, 2^200: decode errors or values, never a crash.
#[test]
fn deep_nesting_and_huge_numbers_are_typed_results() {
    let deep = b"[".repeat(100_000);
    let e = parse_message(&deep).expect_err("too deep");
    assert!(e.message.contains("recursion limit"), "{e}");
    let mut obj = b"{\"return\": ".to_vec();
    obj.extend_from_slice(&deep);
    assert!(parse_message(&obj).is_err());
    assert!(parse_message(b"{\"return\": 1e999999}").is_err());
    let two_200 = parse_message(
        b"{\"return\": 1606938044258990275541962092341162602522202993782792835301376}",
    )
    .expect("2^200 is a (lossy) float");
    assert!(matches!(two_200, QmpMessage::Reply { result: Ok(v), .. } if v.is_f64()));

    let mut dec = AgentDecoder::new();
    dec.push(&deep);
    dec.push(b"\n\xff{\"return\": 3}\n");
    assert!(dec.next_message().is_err());
    dec.start_resync();
    let m = dec
        .next_message()
        .expect("after resync")
        .expect("a message");
    assert!(is_sync_reply(&m, 3));
}

/// A line over qemu-ga's 80 MiB cap is a typed error; a resync then recovers.
#[test]
fn agent_line_over_the_limit_is_a_decode_error_then_resync_recovers() {
    let mut dec = AgentDecoder::new();
    let chunk = vec![b'a'; 1 << 20];
    let mut pushed = 0;
    let err = loop {
        dec.push(&chunk);
        pushed += chunk.len();
        match dec.next_message() {
            Ok(None) => assert!(pushed <= MAX_REPLY_LINE, "{pushed} bytes buffered"),
            Ok(Some(m)) => panic!("message from a run of 'a': {m:?}"),
            Err(e) => break e,
        }
    };
    assert!(pushed <= MAX_REPLY_LINE + chunk.len());
    assert!(err.message.contains("longer than"), "{err}");
    dec.start_resync();
    dec.push(b"aaaa\xff{\"return\": 9}\n");
    let m = dec.next_message().expect("decodes").expect("a message");
    assert!(is_sync_reply(&m, 9), "{m:?}");
}

/// QMP's 64 MiB cap, pushed in one piece: `LineTooLong`, nothing buffered beyond it.
#[test]
fn qmp_line_over_the_default_limit_is_line_too_long() {
    let mut framer = LineFramer::default();
    framer.push(&vec![b'{'; DEFAULT_MAX_LINE + 2]);
    assert_eq!(
        framer.next_line(),
        Err(LineTooLong {
            limit: DEFAULT_MAX_LINE
        })
    );
    assert_eq!(framer.bytes_moved(), 0);
}

/// Every strict prefix of a valid header is `Truncated` (or, empty, not a save file).
#[test]
fn savefile_header_prefixes_are_truncated() {
    let bytes = encode_header(&random_header(&mut Rng::new(3)));
    assert!(parse_header(&bytes).is_ok());
    assert_eq!(parse_header(b""), Err(SaveFileError::NotASaveFile));
    for cut in 1..bytes.len() {
        assert_eq!(
            parse_header(&bytes[..cut]),
            Err(SaveFileError::Truncated),
            "cut at {cut}"
        );
    }
}

/// Each finding of this harness, as it minimised it: the literal input with its case seed
/// (which fixes the chunking, the framer limit and the sync id), replayed through the
/// property that failed. The codecs' unit tests have a readable version of each.
#[test]
fn fuzz_findings_replay() {
    // LineFramer: a line of exactly the limit (40) with its "\r" pushed before its "\n" was
    // rejected one byte at a time but accepted whole
    // (qmp::codec::tests::line_at_the_limit_with_split_crlf_is_accepted).
    assert_eq!(framer_limit(0x5fdf_9b39_e903_20f4), 40);
    framer_property(
        b"roseconds\":815127,\"seconds\":1795292741}}\r",
        0x5fdf_9b39_e903_20f4,
    )
    .expect("qmp_framer finding");
    // AgentDecoder: junk without a newline after an earlier 0xFF hid the sync reply
    // (agent::codec::tests::resync_finds_reply_after_unterminated_junk_following_an_earlier_delimiter).
    assert_eq!(sync_id(0x032c_da90_d88b_56a8), 231_275_785_753_688);
    resync_property(
        b"\xffJ\xff{\"return\": 231275785753688}\n",
        0x032c_da90_d88b_56a8,
    )
    .expect("agent_resync finding");
}
