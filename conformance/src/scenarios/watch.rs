//! Watching a domain (issue 11, `docs/semantics.md` §12): the serial console as a stream,
//! statistics that move, waiting for events without races. Generic over [`TestBackend`]
//! like every other scenario; everything goes through the uniform API, the guest's shell on
//! its console included (the test guest runs one, `scripts/guest/init`).
//!
//! Boots: only the scenarios where the guest takes part boot it (the banner, a typed
//! command, work that moves the counters); the others start the domain paused, which costs
//! no guest CPU under TCG.

use crate::backend::{GuestOptions, TestBackend};
use crate::scenario::*;
use domkit_core::{
    Boot, ConsoleAccess, ConsoleStream, Disk, DiskFormat, Domain, DomainState, Driver, Error,
    EventFilter, EventKind, EventName, Operation, PausedReason, ResumedDetail, StartOptions,
    StartedDetail, SuspendedDetail,
};
use futures::StreamExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use EventKind as E;

/// The line the test guest prints on its console once booted (`scripts/guest/init`).
pub(super) const READY: &[u8] = b"DOMKIT-GUEST-READY";
/// The first words a Linux kernel prints when it boots.
const BANNER: &[u8] = b"Linux version";
/// How long a console stream may take to end after its domain stopped.
pub(super) const CONSOLE_END: Duration = Duration::from_secs(10);
/// How much console output a scenario keeps to search in (the guest controls it).
const KEEP: usize = 256 * 1024;

/// Output read from a console so far (the last [`KEEP`] bytes).
#[derive(Default)]
pub(super) struct Seen(pub(super) Vec<u8>);

impl Seen {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > KEEP {
            let cut = self.0.len() - KEEP;
            self.0.drain(..cut);
        }
    }

    pub(super) fn contains(&self, needle: &[u8]) -> bool {
        self.0.windows(needle.len()).any(|w| w == needle)
    }

    pub(super) fn tail(&self) -> String {
        let from = self.0.len().saturating_sub(400);
        String::from_utf8_lossy(&self.0[from..]).into_owned()
    }
}

/// Read `console` until `needle` was seen, at most `within`.
pub(super) async fn read_until(
    console: &mut ConsoleStream,
    seen: &mut Seen,
    needle: &[u8],
    within: Duration,
) -> Step {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, console.read(&mut buf)).await {
            Err(_) => {
                return fail(format!(
                    "{:?} not on the console within {within:?}; its last output: {:?}",
                    String::from_utf8_lossy(needle),
                    seen.tail()
                ))
            }
            Ok(Err(e)) => return fail(format!("reading the console: {e}")),
            Ok(Ok(0)) => {
                return fail(format!(
                    "the console ended before {:?}; its last output: {:?}",
                    String::from_utf8_lossy(needle),
                    seen.tail()
                ))
            }
            Ok(Ok(n)) => seen.push(&buf[..n]),
        }
    }
    Ok(())
}

/// Read `console` until its end (the domain stopped), at most `within`.
pub(super) async fn read_to_end(console: &mut ConsoleStream, within: Duration, what: &str) -> Step {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, console.read(&mut buf)).await {
            Err(_) => return fail(format!("{what}: the console did not end within {within:?}")),
            Ok(Err(e)) => return fail(format!("{what}: reading the console failed: {e}")),
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Start `domain` paused, open a console stream, resume, and read up to the guest's ready
/// line: the whole boot output goes through the stream.
pub(super) async fn boot_on_console<D: Domain>(
    domain: &D,
    watch: &mut EventWatch,
    access: ConsoleAccess,
) -> Step<(ConsoleStream, Seen)> {
    domain.start(StartOptions { paused: true }).await?;
    watch
        .expect(&[
            E::Started(StartedDetail::Booted),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    let mut console = domain.console(access).await?;
    check(console.access() == access, || {
        format!("asked for a {access:?} console, got {:?}", console.access())
    })?;
    domain.resume().await?;
    watch.expect(&[E::Resumed(ResumedDetail::Unpaused)]).await?;
    let mut seen = Seen::default();
    read_until(&mut console, &mut seen, READY, BOOT_TIMEOUT).await?;
    Ok((console, seen))
}

/// Type `command` into the guest's shell until `answer` comes back: the shell starts
/// after the ready line, and a console line typed before it runs is lost.
pub(super) async fn run_in_shell(
    console: &mut ConsoleStream,
    seen: &mut Seen,
    command: &str,
    answer: &str,
    within: Duration,
) -> Step {
    let deadline = Instant::now() + within;
    loop {
        if let Err(e) = console.write_all(format!("{command}\n").as_bytes()).await {
            return fail(format!("typing into the console: {e}"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.min(Duration::from_secs(5));
        match read_until(console, seen, answer.as_bytes(), attempt).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
    }
}

/// The boot output of the guest read through a console stream opened before its vCPUs
/// ran; the stream ends when the domain stops; a shut-off domain has no console.
pub(super) async fn console_read_boot_banner<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    // Without `quiet`: the kernel prints its banner (`Linux version ...`) first.
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut config = ctx.backend.guest_config(name, GuestOptions::default());
            if let Boot::Kernel { cmdline, .. } = &mut config.boot {
                *cmdline = cmdline
                    .split_whitespace()
                    .filter(|w| *w != "quiet")
                    .collect::<Vec<_>>()
                    .join(" ");
            }
            Ok(config)
        })
        .await?;
    let shut_off = domain.console(ConsoleAccess::ReadOnly).await;
    if let Err(e @ domkit_core::Error::Unsupported { .. }) = &shut_off {
        // A backend without console streams: a gap, never a pass or a divergence.
        return Err(Stop::Unsupported(e.to_string()));
    }
    expect_err(
        shut_off,
        "invalid_state for a shut-off domain's console",
        is_invalid_state(Operation::Console),
    )?;
    let (mut console, seen) = boot_on_console(&domain, &mut watch, ConsoleAccess::ReadOnly).await?;
    check(console.lost_bytes() == 0, || {
        format!("the reader lost {} bytes of the boot", console.lost_bytes())
    })?;
    let banner = seen.0.windows(BANNER.len()).position(|w| w == BANNER);
    let ready = seen.0.windows(READY.len()).position(|w| w == READY);
    check(
        matches!((banner, ready), (Some(b), Some(r)) if b < r),
        || {
            format!(
            "the boot output read through the stream has no kernel banner before the ready line; its start: {:?}",
            String::from_utf8_lossy(&seen.0[..seen.0.len().min(300)])
        )
        },
    )?;
    domain.destroy().await?;
    read_to_end(&mut console, CONSOLE_END, "after destroy").await?;
    Ok(())
}

/// A command typed into the guest's shell through the stream answers on the stream; a
/// read-only stream cannot type.
pub(super) async fn console_write_command<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    let (mut console, mut seen) =
        boot_on_console(&domain, &mut watch, ConsoleAccess::ReadWrite).await?;
    // The answer differs from the echoed command line: only the shell computes 42.
    run_in_shell(
        &mut console,
        &mut seen,
        "echo dk-$((6*7))-typed",
        "dk-42-typed",
        Duration::from_secs(60),
    )
    .await?;
    let mut reader = domain.console(ConsoleAccess::ReadOnly).await?;
    match reader.write_all(b"echo no\n").await {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        other => return fail(format!("writing a read-only console: {other:?}")),
    }
    // A second reader sees what the writer's command prints from now on.
    let mut reader_seen = Seen::default();
    console
        .write_all(b"echo dk-$((7*6))-again\n")
        .await
        .map_err(|e| Stop::Fail(format!("typing: {e}")))?;
    read_until(
        &mut reader,
        &mut reader_seen,
        b"dk-42-again",
        Duration::from_secs(30),
    )
    .await?;
    domain.destroy().await?;
    read_to_end(&mut console, CONSOLE_END, "the writer, after destroy").await?;
    read_to_end(&mut reader, CONSOLE_END, "the reader, after destroy").await?;
    match console.write_all(b"echo late\n").await {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => fail(format!(
            "typing into the console of a stopped domain: {other:?}"
        )),
    }
}

/// One writer at a time: the next is `busy` while the first is attached, readers are not;
/// the slot is free again once the writer is dropped or released.
pub(super) async fn console_second_writer_busy<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    domain.start(StartOptions { paused: true }).await?;
    watch
        .expect(&[
            E::Started(StartedDetail::Booted),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;
    let first = domain.console(ConsoleAccess::ReadWrite).await?;
    let is_busy = |e: &Error| matches!(e, Error::Busy { .. });
    expect_err(
        domain.console(ConsoleAccess::ReadWrite).await,
        "busy for a second writer",
        is_busy,
    )?;
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(domain.console(ConsoleAccess::ReadOnly).await?);
    }
    drop(first);
    let mut second = domain.console(ConsoleAccess::ReadWrite).await?;
    expect_err(
        domain.console(ConsoleAccess::ReadWrite).await,
        "busy while the second writer is attached",
        is_busy,
    )?;
    second.release_writer();
    let mut third = domain.console(ConsoleAccess::ReadWrite).await?;
    domain.destroy().await?;
    for (i, reader) in readers.iter_mut().enumerate() {
        read_to_end(reader, CONSOLE_END, &format!("reader {i}, after destroy")).await?;
    }
    read_to_end(&mut third, CONSOLE_END, "the writer, after destroy").await?;
    expect_err(
        domain.console(ConsoleAccess::ReadWrite).await,
        "invalid_state for the console of a destroyed domain",
        is_invalid_state(Operation::Console),
    )?;
    Ok(())
}

/// Counters grow while the guest works: cpu time (total and per vCPU) and the disk's read
/// bytes and requests; memory is the configured size; every figure is known; a shut-off
/// domain has its state only; the bulk call has the domain too.
pub(super) async fn stats_move<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let dir = hook(
        "scratch dir",
        tempfile::Builder::new()
            .prefix("stats")
            .tempdir_in(ctx.backend.scratch_dir())
            .map_err(|e| e.to_string()),
    )?;
    let image = dir.path().join("disk.img");
    hook(
        "disk image",
        std::fs::write(&image, vec![0x5a_u8; 8 << 20]).map_err(|e| e.to_string()),
    )?;
    let (domain, mut watch) = ctx
        .define_config("a", |name| {
            let mut config = ctx.backend.guest_config(name, GuestOptions::default());
            config.disks.push(Disk {
                id: None,
                path: image.clone(),
                format: DiskFormat::Raw,
                readonly: true,
                cdrom: false,
            });
            Ok(config)
        })
        .await?;
    let vcpus = domain.info().await?.vcpus;
    let memory_kib = domain.info().await?.memory_mib * 1024;

    let off = domain.stats().await?;
    check(
        off.state == domain.state() && off.cpu.total_ns.is_none() && off.disks.is_empty(),
        || format!("a shut-off domain's stats have figures: {off:?}"),
    )?;

    let (mut console, mut seen) =
        boot_on_console(&domain, &mut watch, ConsoleAccess::ReadWrite).await?;
    let before = domain.stats().await?;
    // Read the whole disk past the guest's page cache (QEMU: vda; Xen: xvda), and spin.
    run_in_shell(
        &mut console,
        &mut seen,
        "echo 3 > /proc/sys/vm/drop_caches; for d in /dev/vda /dev/xvda; do [ -b $d ] && dd if=$d of=/dev/null bs=64k 2>/dev/null; done; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo dk-worked-$((1+1))",
        "dk-worked-2",
        Duration::from_secs(90),
    )
    .await?;
    let after = domain.stats().await?;

    check(after.taken_at_us > before.taken_at_us, || {
        format!(
            "taken_at_us did not advance: {} then {}",
            before.taken_at_us, after.taken_at_us
        )
    })?;
    check(after.state.is_running(), || {
        format!("stats of a running domain say {}", after.state)
    })?;
    let (Some(t0), Some(t1)) = (before.cpu.total_ns, after.cpu.total_ns) else {
        return fail(format!(
            "cpu time unknown: {:?} / {:?}",
            before.cpu, after.cpu
        ));
    };
    check(t1 > t0, || {
        format!("cpu time did not grow: {t0} then {t1} ns")
    })?;
    check(after.cpu.vcpus.len() == vcpus as usize, || {
        format!("{} vCPU entries for {vcpus} vCPUs", after.cpu.vcpus.len())
    })?;
    let vcpu_sum = |s: &domkit_core::DomainStats| -> Option<u64> {
        s.cpu.vcpus.iter().map(|v| v.time_ns).sum::<Option<u64>>()
    };
    match (vcpu_sum(&before), vcpu_sum(&after)) {
        (Some(v0), Some(v1)) if v1 > v0 => {}
        other => return fail(format!("per-vCPU time did not grow: {other:?}")),
    }
    check(after.memory.maximum_kib == Some(memory_kib), || {
        format!(
            "memory maximum {:?}, configured {memory_kib} KiB",
            after.memory.maximum_kib
        )
    })?;
    check(after.memory.current_kib.is_some(), || {
        "current memory unknown".into()
    })?;
    let (Some(d0), Some(d1)) = (before.disks.first(), after.disks.first()) else {
        return fail(format!("no disk entry: {:?}", after.disks));
    };
    match (
        d0.read_bytes,
        d1.read_bytes,
        d0.read_requests,
        d1.read_requests,
    ) {
        (Some(b0), Some(b1), Some(r0), Some(r1)) if b1 >= b0 + (4 << 20) && r1 > r0 => {}
        other => {
            return fail(format!(
                "the disk's read counters did not grow by the 8 MiB read: {other:?}"
            ))
        }
    }

    let all = ctx.driver().all_stats().await?;
    let mine = all.iter().find(|s| s.domain == *domain.id());
    check(
        mine.is_some_and(|s| s.state.is_running() && s.cpu.total_ns.is_some()),
        || format!("all_stats has no running record of the domain: {mine:?}"),
    )?;

    domain.destroy().await?;
    let gone = domain.stats().await?;
    check(
        !gone.state.is_active() && gone.cpu.total_ns.is_none() && gone.disks.is_empty(),
        || format!("a destroyed domain's stats: {gone:?}"),
    )?;
    Ok(())
}

/// `wait_for_event`: a typed timeout when nothing comes (nothing changes); the event when
/// it comes, by name, exact kind or predicate; waiting on a snapshot taken before the
/// operation never misses what the operation caused.
pub(super) async fn wait_for_event_timeout<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.define("a", GuestOptions::default()).await?;
    let state = domain.state();
    let wait = Duration::from_millis(500);
    let started = Instant::now();
    let r = domain
        .wait_for_event(EventFilter::Name(EventName::Started), wait)
        .await;
    let took = started.elapsed();
    expect_err(r, "timeout(wait_event)", |e| {
        matches!(
            e,
            Error::Timeout {
                operation: Operation::WaitEvent,
                ..
            }
        )
    })?;
    check(took >= wait && took < wait + Duration::from_secs(5), || {
        format!("a {wait:?} wait returned after {took:?}")
    })?;
    check(domain.state() == state, || {
        "a wait changed the state".into()
    })?;

    // Snapshot first, then the operation: its events are in the snapshot's stream.
    let mut snap = domain.snapshot();
    domain.start(StartOptions { paused: true }).await?;
    let ev = snap
        .events
        .wait_for(
            &EventFilter::Kind(E::Suspended(SuspendedDetail::Paused)),
            EVENT_TIMEOUT,
        )
        .await?;
    check(ev.seq == snap.seq + 2, || {
        format!(
            "suspended(paused) has seq {}, the snapshot {}: started(booted) should be between",
            ev.seq, snap.seq
        )
    })?;
    expect_exact_state(&domain, DomainState::Paused(PausedReason::User))?;

    // From now on, while another task resumes.
    let resumer = {
        let d = domain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            d.resume().await
        })
    };
    let ev = domain
        .wait_for_event(EventFilter::Name(EventName::Resumed), EVENT_TIMEOUT)
        .await?;
    check(ev.kind == E::Resumed(ResumedDetail::Unpaused), || {
        format!("waited for resumed, got {}", ev.kind)
    })?;
    hook(
        "the resume",
        resumer
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
    )?;

    // A predicate: the first event after a given seq that is a vCPU stop.
    let mark = domain.snapshot();
    domain.pause().await?;
    let after = mark.seq;
    let mut events = domain.subscribe_from(after)?;
    let ev = events
        .wait_for(
            &EventFilter::matching(move |e| {
                e.seq > after && matches!(e.kind, EventKind::Suspended(_))
            }),
            EVENT_TIMEOUT,
        )
        .await?;
    check(ev.seq == after + 1, || {
        format!("the pause's event has seq {}, want {}", ev.seq, after + 1)
    })?;
    // Nothing else is coming: a second wait times out.
    expect_err(
        events
            .wait_for(&EventFilter::Any, Duration::from_millis(300))
            .await,
        "timeout when nothing more happens",
        |e| matches!(e, Error::Timeout { .. }),
    )?;
    domain.destroy().await?;
    Ok(())
}

/// A burst of operations between a snapshot and the first read of its stream: every event
/// exactly once, in order. `subscribe_from` a seq already seen replays the rest exactly;
/// from a seq no longer kept it is `events_lost` naming the range; a stream that lagged
/// says so.
pub(super) async fn snapshot_then_stream_no_gap<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.define("a", GuestOptions::default()).await?;
    domain.start(StartOptions { paused: true }).await?;
    watch
        .expect(&[
            E::Started(StartedDetail::Booted),
            E::Suspended(SuspendedDetail::Paused),
        ])
        .await?;

    let snap = domain.snapshot();
    check(
        snap.state == DomainState::Paused(PausedReason::User),
        || format!("the snapshot's state is {}", snap.state),
    )?;
    let mut events = snap.events;
    // The burst, from another task, while nothing reads the stream.
    const ROUNDS: usize = 15;
    let burst = {
        let d = domain.clone();
        tokio::spawn(async move {
            for _ in 0..ROUNDS {
                d.resume().await?;
                d.pause().await?;
            }
            Ok::<(), Error>(())
        })
    };
    hook(
        "the burst",
        burst
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
    )?;
    let last = domain.snapshot().seq;
    check(last == snap.seq + 2 * ROUNDS as u64, || {
        format!(
            "{ROUNDS} resume/pause rounds made {} events, want {}",
            last - snap.seq,
            2 * ROUNDS
        )
    })?;
    let mut seqs = Vec::new();
    while seqs.last() != Some(&last) {
        let Ok(Some(ev)) = tokio::time::timeout(EVENT_TIMEOUT, events.next()).await else {
            return fail(format!("the snapshot's stream stopped after seqs {seqs:?}"));
        };
        let want = if seqs.len() % 2 == 0 {
            E::Resumed(ResumedDetail::Unpaused)
        } else {
            E::Suspended(SuspendedDetail::Paused)
        };
        check(ev.kind == want, || {
            format!("event {} is {}, want {want}", ev.seq, ev.kind)
        })?;
        seqs.push(ev.seq);
    }
    let want: Vec<u64> = (snap.seq + 1..=last).collect();
    check(seqs == want, || {
        format!("the snapshot's stream: {seqs:?}, want {want:?}")
    })?;
    check(events.lost() == 0, || {
        format!("{} events lost", events.lost())
    })?;

    // Resume from the middle of what was seen: the rest, exactly.
    let mid = snap.seq + ROUNDS as u64;
    let mut rest = domain.subscribe_from(mid)?;
    for want in mid + 1..=last {
        let Ok(Some(ev)) = tokio::time::timeout(EVENT_TIMEOUT, rest.next()).await else {
            return fail(format!("subscribe_from({mid}) stopped before seq {want}"));
        };
        check(ev.seq == want, || {
            format!("subscribe_from({mid}) gave seq {}, want {want}", ev.seq)
        })?;
    }

    // More events than a domain keeps, while a stream does not read: that stream lags,
    // and subscribe_from the old seq is events_lost naming where it resumes.
    let mut lagging = domain.subscribe();
    const MANY: usize = 70;
    for _ in 0..MANY {
        domain.resume().await?;
        domain.pause().await?;
    }
    let newest = domain.snapshot().seq;
    match domain.subscribe_from(last) {
        Err(Error::EventsLost {
            after, resumed_at, ..
        }) if after == last && resumed_at > last + 1 && resumed_at <= newest => {}
        Err(e) => return fail(format!("subscribe_from an old seq: {e}")),
        Ok(_) => {
            return fail(format!(
                "subscribe_from({last}) after {} newer events: a stream, want events_lost",
                newest - last
            ))
        }
    }
    expect_err(
        lagging
            .wait_for(&EventFilter::Name(EventName::Stopped), EVENT_TIMEOUT)
            .await,
        "events_lost on a stream that lagged",
        |e| matches!(e, Error::EventsLost { .. }),
    )?;
    check(lagging.lost() > 0, || {
        "the lagging stream counts no loss".into()
    })?;
    domain.destroy().await?;
    Ok(())
}
