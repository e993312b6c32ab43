//! The daemon's event journal: every event of every backend, numbered with a host-wide
//! `cursor`, kept in memory (the last `retention` entries) and appended to
//! `<state-dir>/daemon/journal.jsonl` (0600), so a client resumes from its cursor across
//! daemon restarts, and is told with a [`Item::Gap`] what it cannot have.
//!
//! Gaps are journal entries of their own when the daemon knows a domain's events are
//! missing: produced while the daemon was not running (a restart reattaches and the
//! domain's `seq` moved on), or dropped by a lagging driver subscription. A stream
//! synthesises a gap when its cursor is older than what is kept, and when its client fell
//! behind the live broadcast ([`Follower`]).
//!
//! The file is written with `write(2)` per entry and not fsynced: a SIGKILLed daemon loses
//! nothing (the page cache has it); a host crash may lose the tail, which the next start
//! reports as a gap (the domains' `seq` in the driver store is ahead of the journal).

use domkit_core::{DomainEvent, DomainId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;
use uuid::Uuid;

/// How many entries a [`Journal`] keeps unless told otherwise.
pub const DEFAULT_RETENTION: usize = 10_000;

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Host-wide position, starting at 1, +1 per entry, continued across restarts.
    pub cursor: u64,
    /// What it records.
    pub item: Item,
}

/// What a journal entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Item {
    /// An event of a domain of `backend`.
    Event {
        /// `qemu` or `libxl`.
        backend: String,
        /// The event.
        event: DomainEvent,
    },
    /// Missing events: `seq` values of `domain` when it is set, host-wide cursor values
    /// otherwise; both bounds inclusive.
    Gap {
        /// The domain and its backend, for a seq range.
        domain: Option<(DomainId, String)>,
        /// First missing value.
        first: u64,
        /// Last missing value.
        last: u64,
        /// Why they are missing.
        reason: String,
    },
}

impl Item {
    /// The domain this item is about, if any.
    pub fn domain(&self) -> Option<&DomainId> {
        match self {
            Item::Event { event, .. } => Some(&event.domain),
            Item::Gap { domain, .. } => domain.as_ref().map(|(d, _)| d),
        }
    }
}

/// Which entries a stream wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every entry; cursors are host-wide.
    All,
    /// One domain (by uuid: one incarnation); cursors are its `seq`.
    Uuid(Uuid),
    /// Every incarnation of a name that is not defined now; cursors are `seq` values.
    Name(String),
}

impl Filter {
    fn matches(&self, item: &Item) -> bool {
        match self {
            Filter::All => true,
            Filter::Uuid(uuid) => item.domain().is_some_and(|d| d.uuid == *uuid),
            Filter::Name(name) => item.domain().is_some_and(|d| d.name == *name),
        }
    }
}

struct Inner {
    entries: VecDeque<Entry>,
    next_cursor: u64,
    /// The last `seq` journaled (or declared missing) per domain.
    last_seq: HashMap<Uuid, u64>,
    /// The highest `seq` per domain that fell out of the kept window.
    evicted_seq: HashMap<Uuid, u64>,
    /// Each domain's identity and backend, for the gap markers a stream synthesises.
    ids: HashMap<Uuid, (DomainId, String)>,
    file: Option<File>,
    path: Option<PathBuf>,
}

/// The journal (cheap to clone: shared).
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<Entry>,
    retention: usize,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// A journal kept in memory only.
    pub fn in_memory(retention: usize) -> Self {
        Self::from_parts(Vec::new(), None, None, retention)
    }

    /// Open (or create) the journal file `path` (0600; its directory must have been
    /// verified private by the caller) and load its last `retention` entries. A torn last
    /// line (a daemon killed mid-write) is ignored; the file is compacted to the kept
    /// entries when it grew past twice the retention.
    pub fn open(path: &Path, retention: usize) -> io::Result<Self> {
        let retention = retention.max(1);
        let mut loaded = Vec::new();
        let mut lines = 0usize;
        let mut torn_tail = false;
        match std::fs::read(path) {
            Ok(bytes) => {
                torn_tail = bytes.last().is_some_and(|b| *b != b'\n');
                for line in bytes.as_slice().lines() {
                    let line = line?;
                    lines += 1;
                    if let Ok(entry) = serde_json::from_str::<Entry>(&line) {
                        loaded.push(entry);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if lines > retention.saturating_mul(2) {
            let keep = &loaded[loaded.len().saturating_sub(retention)..];
            let mut text = String::new();
            for entry in keep {
                text.push_str(&serde_json::to_string(entry).map_err(io::Error::other)?);
                text.push('\n');
            }
            domkit_core::store::write_atomic(path, text.as_bytes())?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        domkit_core::store::restrict_file(path)?;
        if torn_tail && lines <= retention.saturating_mul(2) {
            // End the torn line, so the next entry starts a line of its own.
            file.write_all(b"\n")?;
        }
        Ok(Self::from_parts(
            loaded,
            Some(file),
            Some(path.to_path_buf()),
            retention,
        ))
    }

    fn from_parts(
        loaded: Vec<Entry>,
        file: Option<File>,
        path: Option<PathBuf>,
        retention: usize,
    ) -> Self {
        let mut inner = Inner {
            entries: VecDeque::new(),
            next_cursor: 1,
            last_seq: HashMap::new(),
            evicted_seq: HashMap::new(),
            ids: HashMap::new(),
            file,
            path,
        };
        for entry in loaded {
            inner.next_cursor = inner.next_cursor.max(entry.cursor + 1);
            note_seq(&mut inner, &entry.item);
            inner.entries.push_back(entry);
            evict(&mut inner, retention);
        }
        let (live, _) = broadcast::channel(1024);
        Journal {
            inner: Arc::new(Mutex::new(inner)),
            live,
            retention: retention.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every step leaves the journal consistent; a panic elsewhere cannot tear it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last `seq` the journal knows of `uuid` (journaled or declared missing).
    pub fn last_seq(&self, uuid: Uuid) -> Option<u64> {
        self.lock().last_seq.get(&uuid).copied()
    }

    /// The cursor the next entry will get.
    pub fn next_cursor(&self) -> u64 {
        self.lock().next_cursor
    }

    /// Record an event; a jump in its domain's `seq` is recorded first as a gap. An event
    /// already journaled (same domain, `seq` not above the last) is ignored.
    pub fn record(&self, backend: &str, event: DomainEvent) {
        self.record_with(
            backend,
            event,
            "not seen by domkitd (its subscription to the driver lagged)",
        );
    }

    /// As [`Journal::record`], with `jump_reason` for a gap before the event.
    pub fn record_with(&self, backend: &str, event: DomainEvent, jump_reason: &str) {
        let mut inner = self.lock();
        let uuid = event.domain.uuid;
        let last = inner.last_seq.get(&uuid).copied();
        if last.is_some_and(|last| event.seq <= last) {
            return;
        }
        let expected = last.map_or(1, |l| l + 1);
        if event.seq > expected {
            let reason = if last.is_some() {
                jump_reason
            } else {
                "before domkitd's journal knew this domain"
            };
            let gap = Item::Gap {
                domain: Some((event.domain.clone(), backend.to_string())),
                first: expected,
                last: event.seq - 1,
                reason: reason.into(),
            };
            self.push(&mut inner, gap);
        }
        self.push(
            &mut inner,
            Item::Event {
                backend: backend.to_string(),
                event,
            },
        );
    }

    /// Declare that `domain`'s events up to `seq` exist (the driver says so, e.g. after a
    /// reattach): those the journal never had are recorded as one gap with `reason`.
    pub fn declare_seq(&self, domain: &DomainId, backend: &str, seq: u64, reason: &str) {
        let mut inner = self.lock();
        let last = inner.last_seq.get(&domain.uuid).copied().unwrap_or(0);
        if seq > last {
            let gap = Item::Gap {
                domain: Some((domain.clone(), backend.to_string())),
                first: last + 1,
                last: seq,
                reason: reason.into(),
            };
            self.push(&mut inner, gap);
        }
    }

    fn push(&self, inner: &mut Inner, item: Item) {
        let entry = Entry {
            cursor: inner.next_cursor,
            item,
        };
        inner.next_cursor += 1;
        note_seq(inner, &entry.item);
        if let Some(file) = &mut inner.file {
            let written = serde_json::to_string(&entry)
                .map_err(io::Error::other)
                .and_then(|mut line| {
                    line.push('\n');
                    // One write(2) per entry (O_APPEND): a kill leaves whole lines or a torn
                    // last one, which the next open ignores.
                    file.write_all(line.as_bytes())
                });
            if let Err(e) = written {
                let path = inner.path.as_deref().unwrap_or(Path::new("?"));
                tracing::error!(path = %path.display(), error = %e, "cannot append to the event journal: events are kept in memory only from now on");
                inner.file = None;
            }
        }
        // Under the lock, so a subscriber that read the backlog under it sees every later
        // entry exactly once on its receiver.
        let _ = self.live.send(entry.clone());
        inner.entries.push_back(entry);
        evict(inner, self.retention);
    }

    /// The kept entries a stream with `filter` resumed after `since` must replay, and a
    /// receiver of every later entry, taken under one lock (no entry missed or doubled).
    /// `since: None`: nothing to replay (live only).
    pub fn subscribe(&self, filter: &Filter, since: Option<u64>) -> Subscription {
        let inner = self.lock();
        let live = self.live.subscribe();
        let mut backlog = Vec::new();
        let mut follower = Follower::new(filter.clone(), since.unwrap_or(0));
        match since {
            None => {
                // Live only: the first live entry is the next one, no gap before it.
                follower.last_cursor = inner.next_cursor - 1;
                follower.last_seq = match filter {
                    Filter::Uuid(uuid) => inner.last_seq.get(uuid).copied(),
                    _ => None,
                };
            }
            Some(since) => {
                let reason = format!(
                    "older than what domkitd keeps (the last {} journal entries)",
                    self.retention
                );
                if let Filter::Uuid(uuid) = filter {
                    // Events of this domain evicted from the window cannot be replayed.
                    if let Some(&evicted) = inner.evicted_seq.get(uuid) {
                        if evicted > since {
                            let id = inner.ids.get(uuid).cloned();
                            backlog.push(follower.gap_seq(id, since + 1, evicted, &reason));
                        }
                    }
                }
                for entry in &inner.entries {
                    if let Some(msg) = follower.accept(entry, &reason) {
                        backlog.extend(msg);
                    }
                }
                if let Filter::Uuid(uuid) = filter {
                    let known = inner.last_seq.get(uuid).copied().unwrap_or(0);
                    let sent = follower.last_seq.unwrap_or(since);
                    if known > sent {
                        let id = inner.ids.get(uuid).cloned();
                        backlog.push(follower.gap_seq(id, sent + 1, known, &reason));
                    }
                }
                follower.last_cursor = follower.last_cursor.max(inner.next_cursor - 1);
            }
        }
        Subscription {
            backlog,
            live,
            follower,
        }
    }
}

/// Keep at most `retention` entries, noting per domain the highest `seq` dropped.
fn evict(inner: &mut Inner, retention: usize) {
    while inner.entries.len() > retention {
        if let Some(old) = inner.entries.pop_front() {
            let top = match &old.item {
                Item::Event { event, .. } => Some((event.domain.uuid, event.seq)),
                Item::Gap {
                    domain: Some((d, _)),
                    last,
                    ..
                } => Some((d.uuid, *last)),
                Item::Gap { .. } => None,
            };
            if let Some((uuid, seq)) = top {
                let e = inner.evicted_seq.entry(uuid).or_insert(0);
                *e = (*e).max(seq);
            }
        }
    }
}

fn note_seq(inner: &mut Inner, item: &Item) {
    let (id, backend, seq) = match item {
        Item::Event { event, backend } => (&event.domain, backend, event.seq),
        Item::Gap {
            domain: Some((d, backend)),
            last,
            ..
        } => (d, backend, *last),
        Item::Gap { .. } => return,
    };
    let e = inner.last_seq.entry(id.uuid).or_insert(0);
    *e = (*e).max(seq);
    inner
        .ids
        .entry(id.uuid)
        .or_insert_with(|| (id.clone(), backend.clone()));
}

/// A stream's start: what to replay, and the live receiver.
#[derive(Debug)]
pub struct Subscription {
    /// Entries (and synthesised gaps) to send first, in order.
    pub backlog: Vec<Entry>,
    /// Every entry after the backlog.
    pub live: broadcast::Receiver<Entry>,
    /// Continuity tracking for the live part (feed it each received entry).
    pub follower: Follower,
}

/// Tracks what a stream has sent and turns each next entry into what to send: nothing
/// (filtered out or already sent), the entry, or a gap and then the entry.
#[derive(Debug)]
pub struct Follower {
    filter: Filter,
    /// The last host-wide cursor sent (or skipped as not matching).
    last_cursor: u64,
    /// For a one-domain stream: the last `seq` sent (or declared missing).
    last_seq: Option<u64>,
}

impl Follower {
    fn new(filter: Filter, since: u64) -> Self {
        let last_seq = match filter {
            Filter::All => None,
            _ => Some(since),
        };
        let last_cursor = match filter {
            Filter::All => since,
            _ => 0,
        };
        Follower {
            filter,
            last_cursor,
            last_seq,
        }
    }

    fn gap_seq(
        &mut self,
        domain: Option<(DomainId, String)>,
        first: u64,
        last: u64,
        reason: &str,
    ) -> Entry {
        self.last_seq = Some(self.last_seq.unwrap_or(0).max(last));
        Entry {
            // Not a journal entry: cursor 0 (docs/daemon.md).
            cursor: 0,
            item: Item::Gap {
                domain,
                first,
                last,
                reason: reason.into(),
            },
        }
    }

    /// What to send for the next entry (in cursor order); `reason` names why a gap found
    /// here exists.
    fn accept(&mut self, entry: &Entry, reason: &str) -> Option<Vec<Entry>> {
        if entry.cursor <= self.last_cursor && self.filter == Filter::All {
            return None;
        }
        let mut out = Vec::new();
        if self.filter == Filter::All {
            if entry.cursor > self.last_cursor + 1 {
                out.push(Entry {
                    cursor: entry.cursor - 1,
                    item: Item::Gap {
                        domain: None,
                        first: self.last_cursor + 1,
                        last: entry.cursor - 1,
                        reason: reason.into(),
                    },
                });
            }
            self.last_cursor = entry.cursor;
            out.push(entry.clone());
            return Some(out);
        }
        self.last_cursor = self.last_cursor.max(entry.cursor);
        if !self.filter.matches(&entry.item) {
            return None;
        }
        // None: a live-only stream of a domain the journal knew nothing of: the first
        // event starts it.
        let sent = self.last_seq;
        match &entry.item {
            Item::Event { backend, event } => {
                if matches!(self.filter, Filter::Uuid(_)) {
                    if let Some(sent) = sent {
                        if event.seq <= sent {
                            return None;
                        }
                        if event.seq > sent + 1 {
                            let domain = Some((event.domain.clone(), backend.clone()));
                            out.push(self.gap_seq(domain, sent + 1, event.seq - 1, reason));
                        }
                    }
                    self.last_seq = Some(event.seq);
                } else if sent.is_some_and(|sent| event.seq <= sent) {
                    // Name filter over several incarnations: the cursor is a seq of any
                    // of them; replay what is above it.
                    return None;
                }
                out.push(entry.clone());
            }
            Item::Gap {
                last,
                first,
                domain,
                reason: why,
            } => {
                let sent = sent.unwrap_or(0);
                if *last <= sent && matches!(self.filter, Filter::Uuid(_)) {
                    return None;
                }
                let first = (*first).max(sent + 1);
                self.last_seq = Some(sent.max(*last));
                out.push(Entry {
                    cursor: entry.cursor,
                    item: Item::Gap {
                        domain: domain.clone(),
                        first,
                        last: *last,
                        reason: why.clone(),
                    },
                });
            }
        }
        Some(out)
    }

    /// What to send for a live entry.
    pub fn next_live(&mut self, entry: &Entry) -> Vec<Entry> {
        self.accept(
            entry,
            "dropped because this client fell behind the live stream",
        )
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domkit_core::{EventKind, StartedDetail};

    fn ev(id: &DomainId, seq: u64) -> DomainEvent {
        DomainEvent {
            domain: id.clone(),
            seq,
            timestamp_us: 0,
            kind: EventKind::Started(StartedDetail::Booted),
            reconciled: false,
        }
    }

    fn gaps(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .filter_map(|e| match &e.item {
                Item::Gap { first, last, .. } => Some((*first, *last)),
                _ => None,
            })
            .collect()
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries
            .iter()
            .filter_map(|e| match &e.item {
                Item::Event { event, .. } => Some(event.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn per_domain_resume_replays_after_the_cursor_and_marks_evicted_events() {
        let a = DomainId {
            name: "a".into(),
            uuid: Uuid::new_v4(),
        };
        let b = DomainId {
            name: "b".into(),
            uuid: Uuid::new_v4(),
        };
        let j = Journal::in_memory(4);
        for seq in 1..=4 {
            j.record("qemu", ev(&a, seq));
            j.record("qemu", ev(&b, seq));
        }
        // Kept: a3 b3 a4 b4.
        let sub = j.subscribe(&Filter::Uuid(a.uuid), Some(3));
        assert_eq!(seqs(&sub.backlog), vec![4]);
        assert!(gaps(&sub.backlog).is_empty());
        let sub = j.subscribe(&Filter::Uuid(a.uuid), Some(0));
        assert_eq!(gaps(&sub.backlog), vec![(1, 2)]);
        assert_eq!(seqs(&sub.backlog), vec![3, 4]);
        // Host-wide: cursors 1..=8, kept 5..=8.
        let sub = j.subscribe(&Filter::All, Some(2));
        assert_eq!(gaps(&sub.backlog), vec![(3, 4)]);
        assert_eq!(sub.backlog.len(), 5);
        let sub = j.subscribe(&Filter::All, Some(6));
        assert_eq!(sub.backlog.len(), 2);
        assert!(gaps(&sub.backlog).is_empty());
    }

    #[test]
    fn a_seq_jump_is_a_gap_entry_and_live_entries_follow_the_backlog() {
        let a = DomainId {
            name: "a".into(),
            uuid: Uuid::new_v4(),
        };
        let j = Journal::in_memory(100);
        j.record("qemu", ev(&a, 1));
        j.declare_seq(&a, "qemu", 3, "while away");
        j.record("qemu", ev(&a, 5));
        let mut sub = j.subscribe(&Filter::Uuid(a.uuid), Some(0));
        assert_eq!(seqs(&sub.backlog), vec![1, 5]);
        assert_eq!(gaps(&sub.backlog), vec![(2, 3), (4, 4)]);
        j.record("qemu", ev(&a, 6));
        j.record("qemu", ev(&a, 6));
        let entry = sub.live.try_recv().expect("live");
        assert_eq!(seqs(&sub.follower.next_live(&entry)), vec![6]);
        assert!(sub.live.try_recv().is_err(), "a duplicate is not journaled");
    }

    #[test]
    fn the_file_survives_a_reopen_and_cursors_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let a = DomainId {
            name: "a".into(),
            uuid: Uuid::new_v4(),
        };
        {
            let j = Journal::open(&path, 10).unwrap();
            j.record("qemu", ev(&a, 1));
            j.record("qemu", ev(&a, 2));
        }
        // A torn last line is ignored.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"cursor\": 3, \"ite").unwrap();
        let j = Journal::open(&path, 10).unwrap();
        assert_eq!(j.next_cursor(), 3);
        assert_eq!(j.last_seq(a.uuid), Some(2));
        let sub = j.subscribe(&Filter::All, Some(1));
        assert_eq!(seqs(&sub.backlog), vec![2]);
    }
}
