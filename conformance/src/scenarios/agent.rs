//! The guest agent (issue 9, `docs/semantics.md` §13): the typed client every backend hands
//! out through [`Domain::guest_agent`], against the real agent in the real test guest.
//!
//! Everything goes through the uniform API: the agent client from the trait, and for the
//! checks made from inside the guest, `guest-exec` of that same client (the test guest runs
//! qemu-ga with no command blocked). A command the test guest cannot support is reported as
//! `unsupported` with the guest's own reason ([`AgentError::Unsupported`], or what the guest
//! printed when a precondition cannot be set up), never counted as a pass.
//!
//! Cost: each scenario boots one guest (about 5 s under TCG) and keeps to a few seconds of
//! agent traffic; `agent_hostile` boots two (the second shows another domain unaffected).
//! The guest-side helpers are `scripts/guest/sbin/agent-ctl` (stop/start qemu-ga, the
//! hostile programs) and `scripts/guest/sbin/chpasswd`.

use crate::backend::{GuestOptions, TestBackend};
use crate::scenario::*;
use domkit_core::agent::types::{
    FileOpenMode, FsFreezeStatus, GuestExecRequest, GuestLogicalProcessor, SeekWhence,
    SetUserPassword, SCHEMA_COMMANDS,
};
use domkit_core::{
    AgentError, Domain, DomainState, Driver, Error, EventFilter, EventKind, GuestAgent,
    ResumedDetail, RunningReason, ShutdownMode, ShutdownOptions, ShutdownOutcome,
    ShutdownRequester, ShutdownWait, ShutoffReason, StoppedDetail, SuspendedDetail,
};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use EventKind as E;

/// A guest agent result as a scenario step: the guest's `unsupported` is a gap (with its
/// reason), anything else unexpected a failure.
fn ag<T>(what: &str, r: Result<T, AgentError>) -> Step<T> {
    match r {
        Ok(v) => Ok(v),
        Err(AgentError::Unsupported { command, reason }) => Err(Stop::Unsupported(format!(
            "{what}: the test guest cannot run `{command}`: {reason}"
        ))),
        Err(e) => fail(format!("{what}: {e}")),
    }
}

/// The domain's agent through the trait (`no_guest_agent` / backend `unsupported`: a gap).
async fn agent_of<D: Domain>(domain: &D) -> Step<Arc<GuestAgent>> {
    match domain.guest_agent().await {
        Ok(a) => Ok(a),
        Err(e @ (Error::NoGuestAgent { .. } | Error::Unsupported { .. })) => {
            Err(Stop::Unsupported(e.to_string()))
        }
        Err(e) => fail(format!("guest_agent(): {e}")),
    }
}

/// What a command run in the guest through `guest-exec` ended with.
struct Ran {
    code: Option<i64>,
    out: String,
    err: String,
}

/// Runs `/bin/sh -c script` in the guest through the agent and waits for it (at most 30 s).
async fn guest_sh(agent: &GuestAgent, script: &str) -> Step<Ran> {
    let pid = ag(
        "guest-exec",
        agent
            .exec(&GuestExecRequest {
                path: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                capture_output: true,
                ..Default::default()
            })
            .await,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = ag("guest-exec-status", agent.exec_status(pid).await)?;
        if st.exited {
            let text =
                |d: Option<Vec<u8>>| String::from_utf8_lossy(&d.unwrap_or_default()).into_owned();
            return Ok(Ran {
                code: st.exit_code,
                out: text(st.out_data),
                err: text(st.err_data),
            });
        }
        if Instant::now() > deadline {
            return fail(format!("guest command {script:?} still runs after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// As [`guest_sh`], failing unless it exits 0; returns stdout.
async fn guest_ok(agent: &GuestAgent, script: &str) -> Step<String> {
    let ran = guest_sh(agent, script).await?;
    if ran.code != Some(0) {
        return fail(format!(
            "guest command {script:?} exited {:?}: {}",
            ran.code,
            ran.err.trim()
        ));
    }
    Ok(ran.out)
}

/// Starts `/bin/sh -c script` in the guest without waiting (for agent-ctl, which detaches).
async fn guest_spawn(agent: &GuestAgent, script: &str) -> Step {
    ag(
        "guest-exec",
        agent
            .exec(&GuestExecRequest {
                path: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                ..Default::default()
            })
            .await,
    )
    .map(drop)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Pings until the agent answers (after it was restarted in the guest), at most `within`.
async fn until_answers(agent: &GuestAgent, within: Duration) -> Step {
    let deadline = Instant::now() + within;
    loop {
        match agent.ping().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return fail(format!(
                    "the agent does not answer again after {within:?}: {e}"
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------

pub(super) async fn agent_ping_info<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    // No channel: typed, and it says what to add (§13.1).
    let bare = GuestOptions {
        no_agent: true,
        ..Default::default()
    };
    let (plain, _w) = ctx.launch("b", bare).await?;
    match plain.guest_agent().await {
        Err(e @ Error::NoGuestAgent { .. }) => {
            check(e.to_string().contains("kind = \"guest_agent\""), || {
                format!("no_guest_agent does not say what to add: {e}")
            })?
        }
        Err(e @ Error::Unsupported { .. }) => return Err(Stop::Unsupported(e.to_string())),
        other => return fail(format!("guest_agent() without a channel: {other:?}")),
    }
    plain.destroy().await?;

    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    ag("guest-ping", agent.ping().await)?;
    ag("guest-sync-delimited", agent.sync_delimited().await)?;
    ag("guest-sync", agent.guest_sync(31_337).await)?;
    let again = agent_of(&domain).await?;
    check(Arc::ptr_eq(&agent, &again), || {
        "guest_agent() handed out a second client: the channel serves one".into()
    })?;
    let info = ag("guest-info", agent.info().await)?;
    check(!info.version.is_empty(), || {
        "guest-info without a version".into()
    })?;
    let missing: Vec<&str> = SCHEMA_COMMANDS
        .iter()
        .copied()
        .filter(|c| info.command(c).is_none())
        .collect();
    check(missing.is_empty(), || {
        format!("guest-info does not list {missing:?}")
    })?;
    for c in ["guest-shutdown", "guest-suspend-ram"] {
        let entry = info.command(c).expect("listed");
        check(!entry.success_response, || {
            format!("{c} claims a success response")
        })?;
    }
    // An unknown command: unsupported with the guest's reason, and the channel still works.
    match agent.execute("guest-domkit-no-such-command", None).await {
        Err(AgentError::Unsupported { reason, .. }) => {
            check(!reason.is_empty(), || "unsupported without a reason".into())?
        }
        other => return fail(format!("unknown command: want unsupported, got {other:?}")),
    }
    ag("guest-ping after an error", agent.ping().await)?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    watch.expect_quiet(QUIET).await
}

pub(super) async fn agent_time<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let skew = |guest: i64| (guest - now_ns()).abs();
    let t = ag("guest-get-time", agent.get_time().await)?;
    check(skew(t) < 300_000_000_000, || {
        format!(
            "guest clock {t} is more than 5 min off the host's {}",
            now_ns()
        )
    })?;
    let hour = 3_600_000_000_000i64;
    match agent.set_time(Some(now_ns() + hour)).await {
        // qemu-ga syncs the hardware clock after setting the time (`hwclock -w`, or `-s`
        // for "from the RTC"): a guest without an RTC (a Xen PV guest has none) cannot run
        // guest-set-time at all. Its own reason, checked inside the guest.
        Err(AgentError::CommandFailed { desc, .. }) if desc.contains("hwclock") => {
            let rtc = guest_sh(&agent, "ls /dev/rtc0").await?;
            // The system time was set before hwclock failed: put it back (same failure).
            let _ = agent.set_time(Some(now_ns())).await;
            if rtc.code != Some(0) {
                return Err(Stop::Unsupported(format!(
                    "the test guest cannot run `guest-set-time`: it has no RTC ({}), which \
                     qemu-ga syncs with hwclock: {desc}",
                    rtc.err.trim()
                )));
            }
            return fail(format!("guest-set-time: {desc} (the guest has /dev/rtc0)"));
        }
        r => ag("guest-set-time", r)?,
    }
    let t = ag("guest-get-time", agent.get_time().await)?;
    check((t - now_ns() - hour).abs() < 60_000_000_000, || {
        format!(
            "after setting host+1h the guest says {t} (host {})",
            now_ns()
        )
    })?;
    let date = guest_ok(&agent, "date +%s").await?;
    let guest_s: i64 = date.trim().parse().unwrap_or(0);
    check(
        (guest_s - now_ns() / 1_000_000_000 - 3600).abs() < 60,
        || format!("inside the guest `date` says {guest_s} after set-time host+1h"),
    )?;
    ag("guest-set-time", agent.set_time(Some(now_ns())).await)?;
    let t = ag("guest-get-time", agent.get_time().await)?;
    check(skew(t) < 60_000_000_000, || {
        format!("after setting the host's time the guest says {t}")
    })?;
    // From the guest's RTC (hwclock in the guest).
    ag("guest-set-time (from the RTC)", agent.set_time(None).await)?;
    let t = ag("guest-get-time", agent.get_time().await)?;
    check(skew(t) < 300_000_000_000, || {
        format!("after set-time from the RTC the guest says {t}")
    })
}

pub(super) async fn agent_file_roundtrip<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let path = "/tmp/domkit-roundtrip.bin";
    // Binary: every byte value, 0xFF (the agent's delimiter) and newlines included.
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .chain([0xff, b'\n', 0, 0xff])
        .collect();
    let h = ag(
        "guest-file-open w+",
        agent.file_open(path, FileOpenMode::WriteRead).await,
    )?;
    let mut written = 0usize;
    for chunk in data.chunks(48 * 1024) {
        let w = ag("guest-file-write", agent.file_write(h, chunk).await)?;
        check(w.count as usize == chunk.len(), || {
            format!("guest-file-write wrote {} of {}", w.count, chunk.len())
        })?;
        written += chunk.len();
    }
    ag("guest-file-flush", agent.file_flush(h).await)?;
    let end = ag(
        "guest-file-seek end",
        agent.file_seek(h, 0, SeekWhence::End).await,
    )?;
    check(end.position as usize == written, || {
        format!(
            "seek to end: position {} after writing {written}",
            end.position
        )
    })?;
    let mid = ag(
        "guest-file-seek set",
        agent.file_seek(h, 1000, SeekWhence::Set).await,
    )?;
    check(mid.position == 1000, || {
        format!("seek set 1000: {}", mid.position)
    })?;
    let back = ag(
        "guest-file-seek cur",
        agent.file_seek(h, -1000, SeekWhence::Cur).await,
    )?;
    check(back.position == 0, || {
        format!("seek cur -1000: {}", back.position)
    })?;
    let mut read = Vec::new();
    loop {
        let r = ag("guest-file-read", agent.file_read(h, 64 * 1024).await)?;
        read.extend_from_slice(&r.data);
        if r.eof || r.data.is_empty() {
            break;
        }
        if read.len() > data.len() {
            return fail("guest-file-read returns more than was written");
        }
    }
    check(read == data, || {
        format!(
            "read back {} bytes, not the {} written",
            read.len(),
            data.len()
        )
    })?;
    ag("guest-file-close", agent.file_close(h).await)?;
    // A closed handle is a typed error, and the channel stays usable.
    match agent.file_read(h, 16).await {
        Err(AgentError::CommandFailed { desc, .. }) => check(desc.contains("handle"), || {
            format!("read of a closed handle: {desc}")
        })?,
        other => return fail(format!("read of a closed handle: {other:?}")),
    }
    // From inside the guest: the file is there with that size and its last bytes.
    let size = guest_ok(&agent, &format!("wc -c < {path}")).await?;
    check(size.trim() == data.len().to_string(), || {
        format!("inside the guest the file has {} bytes", size.trim())
    })?;
    let tail = guest_ok(&agent, &format!("tail -c 4 {path} | od -An -tx1")).await?;
    check(
        tail.split_whitespace().collect::<Vec<_>>() == ["ff", "0a", "00", "ff"],
        || format!("inside the guest the file ends in {}", tail.trim()),
    )?;
    // Read-only open, and a path that cannot be opened.
    let h = ag(
        "guest-file-open r",
        agent.file_open(path, FileOpenMode::Read).await,
    )?;
    let r = ag("guest-file-read", agent.file_read(h, 4).await)?;
    check(r.data == data[..4], || {
        "read-only reopen reads other bytes".into()
    })?;
    ag("guest-file-close", agent.file_close(h).await)?;
    match agent
        .file_open("/domkit/no/such/dir/f", FileOpenMode::Read)
        .await
    {
        Err(AgentError::CommandFailed { .. }) => {}
        other => return fail(format!("open of a missing path: {other:?}")),
    }
    guest_ok(&agent, &format!("rm -f {path}")).await.map(drop)
}

/// Mounts a small ext filesystem (a loop device over a file in the guest's tmpfs) at
/// `/mnt/domkit`: the test guest's root is an initramfs, which cannot be frozen or trimmed.
/// A guest that cannot do it: `unsupported` with what it printed.
async fn freezable_fs(agent: &GuestAgent) -> Step<&'static str> {
    let mnt = "/mnt/domkit";
    let ran = guest_sh(
        agent,
        "set -e; mkdir -p /mnt/domkit; dd if=/dev/zero of=/tmp/domkit-fs.img bs=1M count=8 \
         2>/dev/null; dev=$(losetup -f); losetup \"$dev\" /tmp/domkit-fs.img; \
         mke2fs -q \"$dev\"; mount \"$dev\" /mnt/domkit",
    )
    .await?;
    if ran.code != Some(0) {
        return Err(Stop::Unsupported(format!(
            "the test guest cannot mount a freezable filesystem: {}",
            ran.err.trim()
        )));
    }
    Ok(mnt)
}

pub(super) async fn agent_fsfreeze_thaw<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let mnt = freezable_fs(&agent).await?;
    let st = ag("guest-fsfreeze-status", agent.fsfreeze_status().await)?;
    check(st == FsFreezeStatus::Thawed, || {
        format!("status before: {st:?}")
    })?;
    // A writer that waits a moment (the freeze comes meanwhile), then writes and syncs.
    let writer = ag(
        "guest-exec",
        agent
            .exec(&GuestExecRequest {
                path: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    format!(
                        "sleep 1; t0=$(cut -d' ' -f1 /proc/uptime); echo x > {mnt}/f; \
                         sync {mnt}/f; t1=$(cut -d' ' -f1 /proc/uptime); \
                         echo \"$t0 $t1\" > /tmp/domkit-writer"
                    ),
                ],
                ..Default::default()
            })
            .await,
    )?;
    let n = ag("guest-fsfreeze-freeze", agent.fsfreeze_freeze().await)?;
    check(n >= 1, || {
        format!("guest-fsfreeze-freeze froze {n} filesystems")
    })?;
    let st = ag("guest-fsfreeze-status", agent.fsfreeze_status().await)?;
    check(st == FsFreezeStatus::Frozen, || {
        format!("status when frozen: {st:?}")
    })?;
    // While frozen the agent disables what could touch the filesystems: unsupported, with
    // the guest's reason.
    match agent
        .exec(&GuestExecRequest {
            path: "/bin/true".into(),
            ..Default::default()
        })
        .await
    {
        Err(AgentError::Unsupported { reason, .. }) => check(reason.contains("frozen"), || {
            format!("guest-exec while frozen: {reason}")
        })?,
        other => {
            return fail(format!(
                "guest-exec while frozen: want unsupported, got {other:?}"
            ))
        }
    }
    // The domain's other operations are not held up by the freeze (§13.5).
    domain.pause().await?;
    domain.resume().await?;
    watch
        .expect(&[
            E::Suspended(SuspendedDetail::Paused),
            E::Resumed(ResumedDetail::Unpaused),
        ])
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = ag("guest-fsfreeze-thaw", agent.fsfreeze_thaw().await)?;
    check(n >= 1, || format!("guest-fsfreeze-thaw thawed {n}"))?;
    let st = ag("guest-fsfreeze-status", agent.fsfreeze_status().await)?;
    check(st == FsFreezeStatus::Thawed, || {
        format!("status after thaw: {st:?}")
    })?;
    // The writer started before the freeze: its write blocked while frozen (it measures
    // itself with the guest's uptime, into the unfrozen /tmp).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = ag("guest-exec-status", agent.exec_status(writer).await)?;
        if st.exited {
            check(st.exit_code == Some(0), || format!("the writer: {st:?}"))?;
            break;
        }
        if Instant::now() > deadline {
            return fail("the write did not finish after the thaw");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = guest_ok(&agent, "cat /tmp/domkit-writer").await?;
    let t: Vec<f64> = took
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    check(t.len() == 2 && t[1] - t[0] >= 1.5, || {
        format!("the write to the frozen filesystem did not block (uptimes {took:?})")
    })?;
    // Freeze by mount point.
    let n = ag(
        "guest-fsfreeze-freeze-list",
        agent.fsfreeze_freeze_list(Some(&[mnt])).await,
    )?;
    check(n == 1, || format!("freeze-list [{mnt}] froze {n}"))?;
    let n = ag("guest-fsfreeze-thaw", agent.fsfreeze_thaw().await)?;
    check(n == 1, || format!("thaw after freeze-list thawed {n}"))?;
    guest_ok(
        &agent,
        &format!("cat {mnt}/f; umount {mnt}; losetup -D 2>/dev/null; true"),
    )
    .await
    .map(drop)
}

pub(super) async fn agent_fsinfo_fstrim<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let mnt = freezable_fs(&agent).await?;
    let fs = ag("guest-get-fsinfo", agent.get_fsinfo().await)?;
    let ours = fs.iter().find(|f| f.mountpoint == mnt);
    let Some(ours) = ours else {
        return fail(format!("guest-get-fsinfo does not list {mnt}: {fs:?}"));
    };
    check(ours.fs_type.starts_with("ext"), || {
        format!("{mnt} has type {}", ours.fs_type)
    })?;
    if let (Some(used), Some(total)) = (ours.used_bytes, ours.total_bytes) {
        check(used <= total && total > 4 * 1024 * 1024, || {
            format!("{mnt}: used {used} of {total} bytes")
        })?;
    }
    let trim = ag("guest-fstrim", agent.fstrim(None).await)?;
    let Some(ours) = trim.paths.iter().find(|p| p.path == mnt) else {
        return fail(format!("guest-fstrim did not try {mnt}: {trim:?}"));
    };
    if let Some(err) = &ours.error {
        return Err(Stop::Unsupported(format!(
            "the test guest cannot trim {mnt}: {err}"
        )));
    }
    let trim = ag("guest-fstrim minimum", agent.fstrim(Some(1 << 20)).await)?;
    check(trim.paths.iter().any(|p| p.path == mnt), || {
        format!("guest-fstrim(minimum 1 MiB): {trim:?}")
    })?;
    guest_ok(
        &agent,
        &format!("umount {mnt}; losetup -D 2>/dev/null; true"),
    )
    .await
    .map(drop)
}

pub(super) async fn agent_network<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let ifaces = ag(
        "guest-network-get-interfaces",
        agent.network_get_interfaces().await,
    )?;
    let Some(lo) = ifaces.iter().find(|i| i.name == "lo") else {
        return fail(format!("no lo among {ifaces:?}"));
    };
    check(
        lo.ip_addresses
            .iter()
            .any(|a| a.ip_address == "127.0.0.1" && a.prefix == 8 && a.ip_address_type == "ipv4"),
        || format!("lo has no 127.0.0.1/8: {lo:?}"),
    )?;
    let stats = lo.statistics();
    check(stats.is_some(), || format!("lo without statistics: {lo:?}"))?;
    // What the guest itself sees.
    let names = guest_ok(&agent, "ls /sys/class/net").await?;
    for n in names.split_whitespace() {
        check(ifaces.iter().any(|i| i.name == n), || {
            format!("the guest has {n}, the agent does not list it")
        })?;
    }
    Ok(())
}

pub(super) async fn agent_vcpus<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx
        .define_config("a", |name| {
            let mut c = ctx.backend.guest_config(name, GuestOptions::default());
            c.vcpus = 2;
            Ok(c)
        })
        .await?;
    domain.start(Default::default()).await?;
    hook(
        "waiting for the guest to be ready",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    let agent = agent_of(&domain).await?;
    let cpus = ag("guest-get-vcpus", agent.get_vcpus().await)?;
    check(cpus.len() == 2 && cpus.iter().all(|c| c.online), || {
        format!("2 vCPUs configured, the guest has {cpus:?}")
    })?;
    let Some(cpu1) = cpus.iter().find(|c| c.can_offline == Some(true)) else {
        return Err(Stop::Unsupported(format!(
            "the test guest cannot take any vCPU offline: {cpus:?}"
        )));
    };
    let id = cpu1.logical_id;
    let off = GuestLogicalProcessor {
        logical_id: id,
        online: false,
        can_offline: None,
    };
    let n = ag("guest-set-vcpus offline", agent.set_vcpus(&[off]).await)?;
    check(n == 1, || format!("guest-set-vcpus processed {n} of 1"))?;
    let inside = guest_ok(
        &agent,
        &format!("cat /sys/devices/system/cpu/cpu{id}/online"),
    )
    .await?;
    check(inside.trim() == "0", || {
        format!("inside the guest cpu{id}/online is {}", inside.trim())
    })?;
    let cpus = ag("guest-get-vcpus", agent.get_vcpus().await)?;
    check(cpus.iter().any(|c| c.logical_id == id && !c.online), || {
        format!("after offlining cpu{id}: {cpus:?}")
    })?;
    let on = GuestLogicalProcessor {
        online: true,
        ..off
    };
    let n = ag("guest-set-vcpus online", agent.set_vcpus(&[on]).await)?;
    check(n == 1, || format!("guest-set-vcpus processed {n} of 1"))?;
    let inside = guest_ok(
        &agent,
        &format!("cat /sys/devices/system/cpu/cpu{id}/online"),
    )
    .await?;
    check(inside.trim() == "1", || {
        format!(
            "inside the guest cpu{id}/online is {} after onlining",
            inside.trim()
        )
    })
}

pub(super) async fn agent_memory_blocks<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let info = ag(
        "guest-get-memory-block-info",
        agent.get_memory_block_info().await,
    )?;
    check(info.size > 0 && info.size.is_power_of_two(), || {
        format!("memory block size {}", info.size)
    })?;
    let inside = guest_ok(&agent, "cat /sys/devices/system/memory/block_size_bytes").await?;
    check(
        u64::from_str_radix(inside.trim(), 16).ok() == Some(info.size),
        || {
            format!(
                "the guest says block size 0x{}, the agent {}",
                inside.trim(),
                info.size
            )
        },
    )?;
    let blocks = ag("guest-get-memory-blocks", agent.get_memory_blocks().await)?;
    check(!blocks.is_empty(), || "no memory blocks".into())?;
    let count = guest_ok(&agent, "ls -d /sys/devices/system/memory/memory* | wc -l").await?;
    check(count.trim() == blocks.len().to_string(), || {
        format!(
            "the guest has {} blocks, the agent lists {}",
            count.trim(),
            blocks.len()
        )
    })?;
    // Asking for the state a block already has: one `success` per block.
    let online: Vec<_> = blocks.iter().filter(|b| b.online).copied().collect();
    let resp = ag(
        "guest-set-memory-blocks",
        agent.set_memory_blocks(&online).await,
    )?;
    check(
        resp.len() == online.len()
            && resp.iter().all(|r| {
                r.response == domkit_core::agent::types::GuestMemoryBlockResponseType::Success
            }),
        || format!("guest-set-memory-blocks (no change): {resp:?}"),
    )
}

pub(super) async fn agent_set_user_password<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let shadow_field = |s: &str| -> Option<String> {
        s.lines()
            .find(|l| l.starts_with("root:"))
            .and_then(|l| l.split(':').nth(1))
            .map(str::to_owned)
    };
    let password = "domkit pw: ÿ\u{00e9}!";
    ag(
        "guest-set-user-password",
        agent
            .set_user_password(&SetUserPassword {
                username: "root".into(),
                password: password.as_bytes().to_vec(),
                crypted: false,
            })
            .await,
    )?;
    // Checked inside the guest: the stored hash is crypt(password, its salt).
    let shadow = guest_ok(&agent, "cat /etc/shadow").await?;
    let Some(hash) = shadow_field(&shadow) else {
        return fail(format!(
            "no root entry in the guest's /etc/shadow: {shadow}"
        ));
    };
    let parts: Vec<&str> = hash.split('$').collect();
    check(parts.len() == 4 && parts[1] == "6", || {
        format!("root's hash is not SHA-512 crypt: {hash}")
    })?;
    let pid = ag(
        "guest-exec",
        agent
            .exec(&GuestExecRequest {
                path: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    "mkpasswd -m sha512 -S \"$1\" \"$2\"".into(),
                    "sh".into(),
                    parts[2].into(),
                    password.into(),
                ],
                capture_output: true,
                ..Default::default()
            })
            .await,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let st = ag("guest-exec-status", agent.exec_status(pid).await)?;
        if st.exited {
            break String::from_utf8_lossy(&st.out_data.unwrap_or_default())
                .trim()
                .to_owned();
        }
        if Instant::now() > deadline {
            return fail("mkpasswd in the guest hangs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    check(again == hash, || {
        format!("crypt(password, salt) in the guest is {again}, /etc/shadow has {hash}")
    })?;
    // Already crypted: stored as given.
    let given = "$6$domkitsalt$KFGvYmOKmQGsW1Z4qQ4C3jC0tQk9s3y4u3U1h2Yb9oE5Xc7qQ8t0Y1Z2a3b4c5d6e7f8g9h0i1j2k3l4m5n6o7";
    ag(
        "guest-set-user-password crypted",
        agent
            .set_user_password(&SetUserPassword {
                username: "root".into(),
                password: given.as_bytes().to_vec(),
                crypted: true,
            })
            .await,
    )?;
    let shadow = guest_ok(&agent, "cat /etc/shadow").await?;
    check(shadow_field(&shadow).as_deref() == Some(given), || {
        format!("crypted password not stored as given: {shadow}")
    })?;
    // An unknown user: the guest's error, typed; the channel stays usable.
    match agent
        .set_user_password(&SetUserPassword {
            username: "domkit-nobody".into(),
            password: b"x".to_vec(),
            crypted: false,
        })
        .await
    {
        Err(AgentError::CommandFailed { .. }) => {}
        other => return fail(format!("password of an unknown user: {other:?}")),
    }
    ag("guest-ping", agent.ping().await)
}

pub(super) async fn agent_shutdown_mode<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let outcome = domain
        .shutdown(ShutdownOptions {
            mode: ShutdownMode::Agent,
            wait: ShutdownWait::Completed,
            timeout: EVENT_TIMEOUT,
            destroy_on_timeout: false,
        })
        .await?;
    check(outcome == ShutdownOutcome::Completed, || {
        format!("agent-mode shutdown(completed) returned {outcome:?}")
    })?;
    expect_exact_state(&domain, DomainState::Shutoff(ShutoffReason::Shutdown))?;
    watch
        .expect(&[
            E::ShutdownRequested(ShutdownRequester::Host),
            E::Stopped(StoppedDetail::Shutdown),
        ])
        .await?;
    // Shut off: the agent is not reachable, typed.
    match domain.guest_agent().await {
        Err(Error::InvalidState { .. }) => {}
        other => return fail(format!("guest_agent() of a shut-off domain: {other:?}")),
    }
    watch.expect_quiet(QUIET).await
}

pub(super) async fn agent_reboot_mode<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let before = guest_ok(&agent, "cat /proc/sys/kernel/random/boot_id").await?;
    domain.reboot(ShutdownMode::Agent, BOOT_TIMEOUT).await?;
    watch.expect(&[E::Rebooted]).await?;
    expect_state(&domain, |s| s.is_running(), "running after an agent reboot")?;
    hook(
        "guest ready after the reboot",
        ctx.backend.wait_guest_ready(&domain, BOOT_TIMEOUT).await,
    )?;
    // The same client: it resyncs with the new agent by itself.
    let agent = agent_of(&domain).await?;
    let after = guest_ok(&agent, "cat /proc/sys/kernel/random/boot_id").await?;
    check(before != after, || {
        "the guest did not really reboot (same boot id)".into()
    })?;
    watch.expect_quiet(QUIET).await
}

pub(super) async fn agent_lifecycle_events<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, watch) = ctx.define("a", GuestOptions::default()).await?;
    let mut watch = watch.with_agent_events();
    domain.start(Default::default()).await?;
    watch
        .expect(&[E::Started(domkit_core::StartedDetail::Booted)])
        .await?;
    // A backend without agent support says so here (no command is sent yet).
    let agent = agent_of(&domain).await?;
    // The agent opens its port during boot.
    watch
        .expect_within(&[E::AgentConnected], BOOT_TIMEOUT)
        .await?;
    ag("guest-ping", agent.ping().await)?;
    // Stopped and started again inside the guest, away long enough for a backend that
    // probes the agent (Xen, §13.4: about 5 s to notice) to notice, and for the call below
    // to end while it is still away: its probes leave the channel to be resynced first,
    // for up to the client's sync_timeout (10 s).
    guest_spawn(&agent, "agent-ctl restart-after 20").await?;
    watch.expect(&[E::AgentDisconnected]).await?;
    // While it is away: a call is a typed timeout, bounded, and the domain stays operable.
    let t0 = Instant::now();
    match agent
        .execute_with_timeout("guest-ping", None, Duration::from_millis(500))
        .await
    {
        Err(
            AgentError::Timeout { .. } | AgentError::Disconnected | AgentError::NotConnected { .. },
        ) => {}
        other => return fail(format!("ping with the agent stopped: {other:?}")),
    }
    check(t0.elapsed() < Duration::from_secs(15), || {
        format!("a call to a stopped agent took {:?}", t0.elapsed())
    })?;
    watch.expect(&[E::AgentConnected]).await?;
    until_answers(&agent, Duration::from_secs(30)).await?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    // The domain stops while the agent is connected: disconnected, then stopped.
    domain.destroy().await?;
    watch
        .expect(&[E::AgentDisconnected, E::Stopped(StoppedDetail::Destroyed)])
        .await?;
    watch.expect_quiet(QUIET).await
}

/// Resident memory of this process, in KiB (Linux `/proc/self/statm`).
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

pub(super) async fn agent_hostile<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    let (other, mut other_watch) = ctx.boot("b", GuestOptions::default()).await?;
    let other_agent = agent_of(&other).await?;
    ag("guest-ping", agent.ping().await)?;
    let short = Duration::from_secs(2);
    for (mode, secs) in [("flood", 14u64), ("silent", 14u64)] {
        // The hostile program is on the port once qemu-ga left it and it opened it. The
        // port's events of the previous round must be in first: QEMU holds VSERPORT_CHANGE
        // back up to 1 s (rate limit), and they travel apart from the agent's replies.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut events = domain.snapshot().events;
        let spawned = Instant::now();
        guest_spawn(&agent, &format!("agent-ctl hostile {mode} {secs}")).await?;
        // With probes (Xen) the hostile program is never an agent: only qemu-ga leaving
        // shows; it is on the channel 2 s after the spawn (agent-ctl).
        let follows_port = ctx.backend.agent_events_follow_the_port();
        let kinds: &[EventKind] = if follows_port {
            &[E::AgentDisconnected, E::AgentConnected]
        } else {
            &[E::AgentDisconnected]
        };
        for &kind in kinds {
            events
                .wait_for(&EventFilter::Kind(kind), EVENT_TIMEOUT)
                .await
                .map_err(|e| Stop::Fail(format!("{mode}: waiting for {kind}: {e}")))?;
        }
        let rss0 = rss_kib();
        let started = Instant::now();
        let mut errors = Vec::new();
        // Calls against the hostile program: each ends, typed, within its timeout (+ sync).
        while started.elapsed() < Duration::from_secs(secs - 3) {
            let t0 = Instant::now();
            let r = agent
                .execute_with_timeout("guest-get-time", None, short)
                .await;
            let took = t0.elapsed();
            check(
                took < short + agent.options().sync_timeout + Duration::from_secs(2),
                || format!("{mode}: a call took {took:?}"),
            )?;
            match r {
                // Its fake replies carry no id or another one: never taken for ours. A call
                // may still succeed: its sync is retried until the real agent is back, which
                // answers it. Then the hostile program must have left the port.
                Ok(v) => {
                    // agent-ctl ends the hostile program 2 s + `secs` after the spawn.
                    let left = if follows_port {
                        events
                            .wait_for(
                                &EventFilter::Kind(E::AgentDisconnected),
                                Duration::from_secs(3),
                            )
                            .await
                            .is_ok()
                    } else {
                        spawned.elapsed() >= Duration::from_secs(secs + 2)
                    };
                    if !left {
                        return fail(format!(
                            "{mode}: a reply ({v}) while the hostile program holds the port"
                        ));
                    }
                    break;
                }
                Err(
                    e @ (AgentError::Timeout { .. }
                    | AgentError::Protocol { .. }
                    | AgentError::Disconnected
                    | AgentError::NotConnected { .. }),
                ) => errors.push(e.to_string()),
                Err(e) => return fail(format!("{mode}: untyped outcome {e}")),
            }
            // Meanwhile: the domain's own operations and the other domain are unaffected.
            let t1 = Instant::now();
            domain.pause().await?;
            domain.resume().await?;
            ag("the other domain's agent", other_agent.ping().await)?;
            check(t1.elapsed() < Duration::from_secs(10), || {
                format!("{mode}: pause/resume/other ping took {:?}", t1.elapsed())
            })?;
            watch
                .expect(&[
                    E::Suspended(SuspendedDetail::Paused),
                    E::Resumed(ResumedDetail::Unpaused),
                ])
                .await?;
        }
        let grew = rss_kib().saturating_sub(rss0);
        check(grew < 64 * 1024, || {
            format!("{mode}: the manager grew by {grew} KiB while the guest flooded the channel")
        })?;
        check(!errors.is_empty(), || format!("{mode}: no call was made"))?;
        tracing::info!(mode, calls = errors.len(), first = %errors[0], "hostile agent");
        // The real agent is back after `secs`: the client resyncs with 0xFF by itself.
        until_answers(&agent, Duration::from_secs(secs + 30)).await?;
        let t = ag(
            "guest-get-time after the hostile program",
            agent.get_time().await,
        )?;
        check((t - now_ns()).abs() < 300_000_000_000, || {
            format!("{mode}: a reply after recovery is not the guest's time: {t}")
        })?;
    }
    expect_exact_state(&domain, DomainState::Running(RunningReason::Unpaused))?;
    expect_exact_state(&other, DomainState::Running(RunningReason::Booted))?;
    other_watch.expect_quiet(Duration::from_millis(100)).await?;
    let _ = ctx.driver().list().await?;
    Ok(())
}

// ---- the agent under concurrency, cancellation and a killed backend (§6.0, §13.5) ----

/// Eight callers at once on the domain's one client: each gets its own answer (the channel
/// serves one command at a time; none takes another's reply), and the domain's own
/// operations go on meanwhile.
pub(super) async fn agent_concurrent_calls<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    until_answers(&agent, Duration::from_secs(60)).await?;
    let calls = (0..8i64).map(|i| {
        let agent = agent.clone();
        async move {
            let id = agent.guest_sync(4_000 + i).await;
            let out = guest_ok(&agent, &format!("echo dk-caller-{i}")).await;
            (i, id, out)
        }
    });
    let (results, paused) = tokio::join!(futures::future::join_all(calls), async {
        // A domain operation while the agent is busy: not held up by it (§13.5).
        let r = domain.pause().await;
        let r2 = domain.resume().await;
        r.and(r2)
    });
    paused?;
    for (i, id, out) in results {
        let id = ag("guest-sync", id)?;
        check(id == 4_000 + i, || {
            format!("caller {i}'s guest-sync got {id}, another caller's reply")
        })?;
        let out = out?;
        check(out.trim() == format!("dk-caller-{i}"), || {
            format!("caller {i}'s guest-exec printed {out:?}")
        })?;
    }
    domain.destroy().await?;
    Ok(())
}

/// Calls dropped at every point of their exchange (futures cancelled after 0 to ~2 ms): the
/// next call gets its own reply, never a dropped one's (§13.5: a resync after a cut call).
pub(super) async fn agent_cancelled_calls<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, _watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    until_answers(&agent, Duration::from_secs(60)).await?;
    let mut cut = 0;
    for i in 0..40u64 {
        let after = Duration::from_micros((i * 53) % 2_000);
        if tokio::time::timeout(after, agent.guest_sync(10_000 + i as i64))
            .await
            .is_err()
        {
            cut += 1;
        }
    }
    check(cut > 0, || {
        "no call was cut: the scenario tested nothing".into()
    })?;
    for n in [777i64, 778] {
        let id = ag("guest-sync after the cut calls", agent.guest_sync(n).await)?;
        check(id == n, || {
            format!("guest-sync({n}) got {id}: a dropped call's reply")
        })?;
    }
    let out = guest_ok(&agent, "echo dk-$((6*7))").await?;
    check(out.trim() == "dk-42", || {
        format!("guest-exec printed {out:?}")
    })?;
    expect_exact_state(&domain, DomainState::Running(RunningReason::Booted))?;
    domain.destroy().await?;
    Ok(())
}

/// The backend killed behind the driver's back while agent calls are in flight: every call
/// ends with a typed error within its timeout, the domain is shut off with the §10 reason,
/// and `guest_agent()` is then `invalid_state`.
pub(super) async fn agent_backend_killed<B: TestBackend>(ctx: &ScenarioCtx<'_, B>) -> Step {
    let (domain, mut watch) = ctx.boot("a", GuestOptions::default()).await?;
    let agent = agent_of(&domain).await?;
    until_answers(&agent, Duration::from_secs(60)).await?;
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let agent = agent.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = agent.info().await {
                        return e;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reason = hook(
        "out-of-band kill",
        ctx.backend.kill_out_of_band(&domain).await,
    )?;
    let bound = agent.options().command_timeout + Duration::from_secs(10);
    for c in callers {
        match tokio::time::timeout(bound, c).await {
            Ok(Ok(
                AgentError::Disconnected
                | AgentError::NotConnected { .. }
                | AgentError::Io(_)
                | AgentError::Timeout { .. },
            )) => {}
            Ok(Ok(e)) => return fail(format!("a call cut by the kill: unexpected {e}")),
            Ok(Err(e)) => return fail(format!("a caller task failed: {e}")),
            Err(_) => {
                return fail(format!(
                    "a call cut by the kill still waits after {bound:?}"
                ))
            }
        }
    }
    // The agent's leave may be reported before the stop (§13.4); nothing else.
    let detail = domkit_core::lifecycle::stopped_detail(reason);
    let got: Vec<EventKind> = watch
        .collect_quiet(QUIET)
        .await?
        .into_iter()
        .filter(|k| !matches!(k, E::AgentDisconnected))
        .collect();
    check(got == [E::Stopped(detail)], || {
        format!(
            "events after the kill: {}, want [{}]",
            kinds_list(&got),
            E::Stopped(detail)
        )
    })?;
    match domain.guest_agent().await {
        Err(Error::InvalidState { .. }) => Ok(()),
        other => fail(format!(
            "guest_agent() of the killed domain: want invalid_state, got {:?}",
            other.map(|_| "a client")
        )),
    }
}
