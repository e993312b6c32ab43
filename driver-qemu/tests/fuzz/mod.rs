//! The machinery of the fuzz harness (`tests/fuzz_codecs.rs`), on stable Rust and without
//! dependencies: a seeded xorshift PRNG, the seed corpus (the recorded QEMU 7.2 / qemu-ga 7.2
//! transcripts and the events of the recorded flows), a byte mutator, random chunking, and a
//! runner that counts and times the cases, prints one line per target, and on a failure
//! minimises the input and panics with it as a Rust byte-string literal (ready to paste into
//! a regression test).
//!
//! Everything is deterministic: each target's master seed is derived from its name (and from
//! `DOMKIT_FUZZ_SEED` if set), each case gets its own seed, and a case is a pure function of
//! `(input, case seed)`, so a failure message reproduces it exactly.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

/// Cases per target when `DOMKIT_FUZZ_CASES` is not set. Five targets make 250,000 cases;
/// see docs/conformance.md (`## Fuzzing`) for the measured time of a debug test build.
pub const DEFAULT_CASES: u64 = 50_000;

/// Cases per target: `DOMKIT_FUZZ_CASES` (underscores allowed, e.g. `5_000_000`) or
/// [`DEFAULT_CASES`].
pub fn cases() -> u64 {
    match std::env::var("DOMKIT_FUZZ_CASES") {
        Ok(v) => v
            .replace('_', "")
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("DOMKIT_FUZZ_CASES={v:?} is not a number")),
        Err(_) => DEFAULT_CASES,
    }
}

/// xorshift64* seeded through splitmix64 (any seed, including 0, gives a good stream).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// `true` once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A random element.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// FNV-1a, to derive a target's master seed from its name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ------------------------------------------------------------------------------------------
// Seed corpus
// ------------------------------------------------------------------------------------------

fn fixtures(sub: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(sub)
}

/// The recorded transcripts whose file name starts with `prefix` (`qmp-`, `agent-`), raw.
/// The guest agent's live with its codec, in the domkit-agent crate.
pub fn transcripts(prefix: &str) -> Vec<Vec<u8>> {
    let dir = if prefix.starts_with("agent-") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures")
    } else {
        fixtures("transcripts")
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .filter(|n| n.starts_with(prefix) && n.ends_with(".raw"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no {prefix}*.raw in {}", dir.display());
    names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).expect("transcript"))
        .collect()
}

/// The QMP events of the recorded flows (tests/fixtures/flows), each re-serialised as one
/// `\r\n`-terminated wire line: real event shapes the transcripts do not have
/// (VSERPORT_CHANGE, MIGRATION with every status...).
pub fn flow_event_lines() -> Vec<Vec<u8>> {
    let dir = fixtures("flows");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    names.sort();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for path in names {
        let text = std::fs::read_to_string(&path).expect("flow");
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(event) = record.get("event").filter(|e| e.is_object()) {
                let mut wire = serde_json::to_vec(event).expect("serialise");
                wire.extend_from_slice(b"\r\n");
                if !out.contains(&wire) {
                    out.push(wire);
                }
            }
        }
    }
    assert!(!out.is_empty(), "no events in {}", dir.display());
    out
}

/// The lines of `streams`, without terminators.
pub fn lines_of(streams: &[Vec<u8>]) -> Vec<Vec<u8>> {
    streams
        .iter()
        .flat_map(|s| s.split(|&b| b == b'\n'))
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
        .filter(|l| !l.is_empty())
        .collect()
}

/// 1 to `max` random corpus entries, concatenated (a stream is a sequence of messages).
pub fn concat_seeds(rng: &mut Rng, corpus: &[Vec<u8>], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.range(1, max) {
        let seed: &Vec<u8> = rng.pick(corpus);
        out.extend_from_slice(seed);
    }
    out
}

// ------------------------------------------------------------------------------------------
// Mutations
// ------------------------------------------------------------------------------------------

/// Invalid UTF-8: lone continuation, overlong, truncated, surrogate, out of range, 0xFE/0xFF.
const INVALID_UTF8: &[&[u8]] = &[
    b"\x80",
    b"\xbf\xbf",
    b"\xc0\xaf",
    b"\xc3\x28",
    b"\xc3",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xfe",
    b"\xff\xfe",
];

/// Numbers no f64/u64 holds, and other edge numbers.
const HUGE_NUMBERS: &[&str] = &[
    "1e999999",
    "-1e999999",
    "1e-999999",
    "1E+308",
    "1.7976931348623157e309",
    // 2^200
    "1606938044258990275541962092341162602522202993782792835301376",
    "-1606938044258990275541962092341162602522202993782792835301376",
    "18446744073709551616",
    "-9223372036854775809",
    "9007199254740993",
    "-0",
    "0.0000000000000000000000000000000000000000000000000000000000000000001",
    "123456789012345678901234567890123456789012345678901234567890.5e-3",
    "NaN",
    "Infinity",
    "01",
    "1.",
    ".5",
    "1e",
];

/// JSON fragments and QMP/agent keys, to reach the classifier's branches.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "\\",
    "null",
    "true",
    "\"\\ud800\"",
    "\"\\u00\"",
    "\"\\x41\"",
    "{\"return\": ",
    "{\"return\": {}}",
    "{\"error\": {\"class\": 1, \"desc\": \"x\"}}",
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": [1]}",
    "{\"event\": 5}",
    "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": -1e999, \"microseconds\": \"x\"}}",
    "{\"QMP\": null}",
    "{\"QMP\": {\"version\": 7}}",
    "\"id\": ",
    "\"data\": ",
    "{\"a\":{\"a\":{\"a\":{}}}}",
];

/// What a target's inputs look like, for the mutations that depend on it.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// The framer limit of this case: "line too long" inserts runs around it (0: none).
    pub long_line: usize,
}

/// Applies 1 to 8 random mutations (or, one case in 16, none: the pristine seed).
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], shape: Shape) {
    if rng.one_in(16) {
        return;
    }
    for _ in 0..rng.range(1, 8) {
        if data.len() > 200_000 {
            break;
        }
        mutate_once(rng, data, corpus, shape);
    }
}

fn insert(data: &mut Vec<u8>, pos: usize, bytes: &[u8]) {
    data.splice(pos..pos, bytes.iter().copied());
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], shape: Shape) {
    let len = data.len();
    let pos = rng.below(len + 1);
    match rng.below(17) {
        // Bit flip.
        0 | 1 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Random byte.
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.byte();
        }
        // Truncation (the peer died mid-write), or a stream joined in the middle.
        3 => data.truncate(pos),
        4 => {
            data.drain(..pos);
        }
        // Inserted 0xFF (the agent's sync delimiter) and NUL bytes.
        5 => {
            let n = rng.range(1, 3);
            insert(data, pos, &vec![0xff; n]);
        }
        6 => {
            let n = rng.range(1, 3);
            insert(data, pos, &vec![0; n]);
        }
        7 => {
            let bad = *rng.pick(INVALID_UTF8);
            insert(data, pos, bad);
        }
        // Deep nesting: mostly just over serde_json's limit (128), sometimes 100k.
        8 => {
            // Big inputs are slow in a debug build: keep them to a few percent of the cases.
            let depth = match rng.below(32) {
                0..=25 => rng.range(120, 1_000),
                26..=30 => rng.range(1_000, 10_000),
                _ => 100_000,
            };
            let open = *rng.pick::<&[u8]>(&[&b"["[..], b"{\"a\":", b"[{\"return\":"]);
            // At most ~100 KiB whatever the token: depth counts bytes for the longer ones.
            let n = if open.len() == 1 {
                depth
            } else {
                depth / open.len()
            };
            let mut nest = open.repeat(n);
            if rng.one_in(2) {
                nest.extend(std::iter::repeat(b']').take(n));
            }
            insert(data, pos, &nest);
        }
        // Huge numbers: replace a number of the input, or insert one.
        9 => {
            let num = rng.pick(HUGE_NUMBERS).as_bytes();
            let digit = data.iter().skip(pos).position(u8::is_ascii_digit);
            match digit.filter(|_| rng.one_in(2)) {
                Some(off) => {
                    let start = pos + off;
                    let end = data[start..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(data.len(), |e| start + e);
                    data.splice(start..end, num.iter().copied());
                }
                _ => insert(data, pos, num),
            }
        }
        // Line structure: terminators, blank and whitespace-only lines.
        10 => {
            let t =
                *rng.pick::<&[u8]>(&[&b"\n"[..], b"\r\n", b"\r", b"\n\n", b" \t\r\n", b"\r\r\n"]);
            insert(data, pos, t);
        }
        11 if len > 0 => {
            let end = rng.range(pos.min(len - 1), len);
            let end = end.min(pos + 64);
            data.drain(pos.min(end)..end);
        }
        12 if len > 0 => {
            let start = rng.below(len);
            let end = (start + rng.range(1, 256)).min(len);
            let copy = data[start..end].to_vec();
            insert(data, pos, &copy);
        }
        // Splice in part of another seed.
        13 => {
            let other = rng.pick(corpus);
            if !other.is_empty() {
                let start = rng.below(other.len());
                let end = rng.range(start, other.len());
                insert(data, pos, &other[start..end]);
            }
        }
        // A line over (or exactly at) the framer limit.
        14 if shape.long_line > 0
            && shape.long_line <= 1 << 20
            && (shape.long_line <= 4096 || rng.one_in(8)) =>
        {
            let n = (shape.long_line + rng.range(0, 4)).saturating_sub(2);
            let fill = *rng.pick(b"a \r\xff\"0[");
            insert(data, pos, &vec![fill; n]);
        }
        15 => {
            let t = rng.pick(TOKENS).as_bytes();
            insert(data, pos, t);
        }
        // A short run of random bytes.
        _ => {
            let bytes: Vec<u8> = (0..rng.range(1, 16)).map(|_| rng.byte()).collect();
            insert(data, pos, &bytes);
        }
    }
}

/// Splits `len` bytes into the chunk sizes a reader might see: all at once, one byte at a
/// time, small, medium or large pieces, or a mix (empty reads included).
pub fn chunk_sizes(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mode = rng.below(6);
    if mode == 0 || len == 0 {
        return vec![len];
    }
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let max = match if mode == 5 { rng.range(1, 4) } else { mode } {
            1 if len <= 8192 => 1,
            1 | 2 => 16,
            3 => 512,
            _ => 65_536,
        };
        let n = if mode == 5 && rng.one_in(32) {
            0
        } else {
            rng.range(1, max).min(left)
        };
        out.push(n);
        left -= n;
    }
    out
}

// ------------------------------------------------------------------------------------------
// Runner
// ------------------------------------------------------------------------------------------

/// What a property returns: `Err` describes the violation.
pub type Outcome = Result<(), String>;

/// `return Err(format!(...))` unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

fn check(prop: &dyn Fn(&[u8], u64) -> Outcome, input: &[u8], seed: u64) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| prop(input, seed))) {
        Ok(outcome) => outcome,
        Err(payload) => Err(format!("panicked: {}", panic_text(&*payload))),
    }
}

/// Greedy delta minimisation: drops ever smaller windows while the case still fails.
fn minimise(
    prop: &dyn Fn(&[u8], u64) -> Outcome,
    input: &[u8],
    seed: u64,
    mut why: String,
) -> (Vec<u8>, String) {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut best = input.to_vec();
    let mut budget = 20_000u32;
    let mut window = (best.len() / 2).max(1);
    loop {
        let mut i = 0;
        while i < best.len() && budget > 0 {
            budget -= 1;
            let end = (i + window).min(best.len());
            let mut candidate = best[..i].to_vec();
            candidate.extend_from_slice(&best[end..]);
            match check(prop, &candidate, seed) {
                Err(w) => {
                    best = candidate;
                    why = w;
                }
                Ok(()) => i += window,
            }
        }
        if window == 1 || budget == 0 {
            break;
        }
        window /= 2;
    }
    std::panic::set_hook(quiet);
    (best, why)
}

/// Runs `cases` cases of a target: `generate` makes an input from the case's generator (and
/// seed), `prop` checks it (it must derive any other random choice from the seed). Prints
/// `fuzz NAME: N cases in S s (R cases/s), longest input L bytes`; on a failure, minimises
/// the input and panics with it.
pub fn run(
    name: &str,
    cases: u64,
    mut generate: impl FnMut(&mut Rng, u64) -> Vec<u8>,
    prop: impl Fn(&[u8], u64) -> Outcome,
) {
    let extra = std::env::var("DOMKIT_FUZZ_SEED").unwrap_or_default();
    let mut master = Rng::new(fnv1a(name) ^ fnv1a(&extra));
    let started = Instant::now();
    let mut longest = 0usize;
    for case in 0..cases {
        let seed = master.next_u64();
        let input = generate(&mut Rng::new(seed), seed);
        longest = longest.max(input.len());
        if let Err(why) = check(&prop, &input, seed) {
            let (small, why) = minimise(&prop, &input, seed, why);
            let dump =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{name}-{seed:016x}.bin"));
            let _ = std::fs::write(&dump, &small);
            panic!(
                "fuzz {name}: case {case} (seed {seed:#018x}, input {} bytes) fails: {why}\n\
                 minimised to {} bytes (also in {}), same seed:\n    b\"{}\"",
                input.len(),
                small.len(),
                dump.display(),
                small.escape_ascii()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz {name}: {cases} cases in {secs:.2} s ({:.0} cases/s), longest input {longest} bytes",
        cases as f64 / secs.max(1e-9)
    );
}
