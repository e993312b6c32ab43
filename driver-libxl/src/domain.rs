//! [`LibxlDomain`]: one domkit domain backed by a Xen domain (a domid that changes on every
//! restart and restore), and the [`Domain`] trait implementation.
//!
//! Locking:
//! - `ops` (async mutex): serialises API operations and policy actions of this domain. It is
//!   held only while libxl is called, never while waiting for the guest (a shutdown waiting
//!   for the poweroff needs the policy action that destroys the domain to get the lock).
//! - `backend` (std mutex): the current domid and its death watch. The event dispatcher takes
//!   it to check that an event belongs to the current watch, so creation paths hold it from
//!   `libxl_evenable_domain_death` until `Created` is fed: no event can overtake `Created`.
//!   Order: `backend` before libxl's ctx lock; never held across a long libxl call.

use crate::context::{Context, DeathWatch, LibxlError};
use crate::savefile::{self, SaveHeader, SaveTarget};
use crate::translate::{
    translate_event, translate_input, Fact, FollowUp, LibxlEvent, LibxlEventKind, TraceEntry,
    TraceInput, REASON_SUSPEND,
};
use async_trait::async_trait;
use domkit_core::{
    ControlState, Creation, Domain, DomainConfig, DomainId, DomainInfo, DomainState, Error,
    EventKind, EventStream, Intent, LifecycleCell, Operation, PausedReason, PmSuspendTarget,
    PolicyAction, RestoreOptions, Result, ShutdownMode, ShutdownOptions, ShutdownOutcome,
    ShutdownWait, StartOptions,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

/// The backend name in errors and capabilities.
pub const BACKEND: &str = "libxl";

/// How many trace entries a domain keeps ([`LibxlDomain::trace`]).
const TRACE_LEN: usize = 512;

/// Maps death-watch tokens (`for_user`) to domains, for the event dispatcher.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Weak<DomainInner>>>,
}

impl Registry {
    fn token(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn insert(&self, token: u64, d: Weak<DomainInner>) {
        lock(&self.map).insert(token, d);
    }

    fn remove(&self, token: u64) {
        lock(&self.map).remove(&token);
    }

    /// The domain watching with `token`, if any.
    pub(crate) fn get(&self, token: u64) -> Option<Arc<DomainInner>> {
        lock(&self.map).get(&token).and_then(Weak::upgrade)
    }

    /// Every registered domain.
    pub(crate) fn all(&self) -> Vec<Arc<DomainInner>> {
        lock(&self.map).values().filter_map(Weak::upgrade).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Backend {
    domid: Option<u32>,
    watch: Option<DeathWatch>,
}

pub(crate) struct DomainInner {
    me: Weak<DomainInner>,
    id: DomainId,
    config: DomainConfig,
    libxl_json: String,
    pub(crate) cell: LifecycleCell,
    ctx: Context,
    registry: Arc<Registry>,
    ops: Arc<tokio::sync::Mutex<()>>,
    backend: Mutex<Backend>,
    trace: Mutex<Vec<TraceEntry>>,
}

impl std::fmt::Debug for DomainInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainInner")
            .field("id", &self.id)
            .field("state", &self.cell.state())
            .finish_non_exhaustive()
    }
}

fn backend_err(op: Operation, e: LibxlError) -> Error {
    Error::Backend {
        backend: BACKEND.into(),
        message: format!("{op}: {e}"),
    }
}

fn save_err(e: savefile::SaveFileError) -> Error {
    match e {
        savefile::SaveFileError::Io { context, source } => Error::Io { context, source },
        savefile::SaveFileError::Format { .. } => Error::Protocol {
            message: e.to_string(),
        },
    }
}

impl DomainInner {
    pub(crate) fn new(
        id: DomainId,
        config: DomainConfig,
        libxl_json: String,
        cell: LifecycleCell,
        ctx: Context,
        registry: Arc<Registry>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| DomainInner {
            me: me.clone(),
            id,
            config,
            libxl_json,
            cell,
            ctx,
            registry,
            ops: Arc::new(tokio::sync::Mutex::new(())),
            backend: Mutex::new(Backend::default()),
            trace: Mutex::new(Vec::new()),
        })
    }

    fn domid(&self) -> Option<u32> {
        lock(&self.backend).domid
    }

    fn invalid(&self, operation: Operation) -> Error {
        Error::InvalidState {
            current: self.cell.state(),
            operation,
        }
    }

    /// Translate and feed one input (recorded in the trace). Returns the policy action.
    fn feed(&self, input: TraceInput) -> Option<PolicyAction> {
        let entry = TraceEntry {
            intent: self.cell.with(|l| l.intent()),
            input,
        };
        {
            let mut t = lock(&self.trace);
            if t.len() >= TRACE_LEN {
                t.remove(0);
            }
            t.push(entry);
        }
        let obs = translate_input(&entry)?;
        tracing::debug!(domain = %self.id.name, ?input, ?obs, "observation");
        self.cell.observe(obs)
    }

    /// Feed a fact and carry out any resulting policy action on a policy thread.
    fn feed_fact(&self, fact: Fact) {
        if let Some(action) = self.feed(TraceInput::Fact(fact)) {
            self.spawn_action(action);
        }
    }

    /// A libxl event for this domain (from the dispatcher thread).
    pub(crate) fn on_libxl_event(&self, ev: LibxlEvent) {
        let mut backend = lock(&self.backend);
        if backend.watch.as_ref().map(DeathWatch::token) != Some(ev.for_user) {
            tracing::debug!(domain = %self.id.name, ?ev, "stale libxl event (old watch): ignored");
            return;
        }
        let intent = self.cell.with(|l| l.intent());
        let t = translate_event(&ev, intent);
        tracing::info!(domain = %self.id.name, domid = ev.domid, event = ?ev.kind, ?intent, rule = t.rule, "libxl event");
        let action = self.feed(TraceInput::Event(ev));
        if ev.kind == LibxlEventKind::DomainDeath {
            self.disarm_locked(&mut backend);
        }
        drop(backend);
        if t.follow_up == Some(FollowUp::SoftReset) && action.is_none() {
            self.spawn_soft_reset();
        }
        if let Some(a) = action {
            self.spawn_action(a);
        }
    }

    fn disarm_locked(&self, backend: &mut Backend) {
        if let Some(w) = backend.watch.take() {
            self.registry.remove(w.token());
        }
        backend.domid = None;
    }

    fn disarm(&self) {
        self.disarm_locked(&mut lock(&self.backend));
    }

    fn watch_locked(
        &self,
        backend: &mut Backend,
        domid: u32,
    ) -> std::result::Result<(), LibxlError> {
        let token = self.registry.token();
        self.registry.insert(token, self.me.clone());
        match self.ctx.watch_death(domid, token) {
            Ok(w) => {
                if let Some(old) = backend.watch.replace(w) {
                    self.registry.remove(old.token());
                }
                backend.domid = Some(domid);
                Ok(())
            }
            Err(e) => {
                self.registry.remove(token);
                Err(e)
            }
        }
    }

    /// Watch a fresh watch on the current domid (after a resume: libxl reports a domain's
    /// shutdown only once per watch).
    fn rearm(&self, domid: u32) -> std::result::Result<(), LibxlError> {
        let mut b = lock(&self.backend);
        self.watch_locked(&mut b, domid)
    }

    /// A domain was just created (left paused by libxl): watch it, run it unless `paused`,
    /// and feed `then`, all under the backend lock so no event overtakes `then`.
    fn arm_and_run(
        &self,
        domid: u32,
        paused: bool,
        then: Fact,
    ) -> std::result::Result<(), LibxlError> {
        let mut b = lock(&self.backend);
        self.watch_locked(&mut b, domid)?;
        let is_paused = self
            .ctx
            .domain_info(domid)
            .map(|i| i.paused)
            .unwrap_or(true);
        let r = match (paused, is_paused) {
            (false, true) => self.ctx.unpause(domid),
            (true, false) => self.ctx.pause(domid),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.disarm_locked(&mut b);
            return Err(e);
        }
        let action = self.feed(TraceInput::Fact(then));
        drop(b);
        if let Some(a) = action {
            self.spawn_action(a);
        }
        Ok(())
    }

    fn spawn_action(&self, action: PolicyAction) {
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name("domkit-libxl-policy".into())
            .spawn(move || {
                let _op = me.ops.blocking_lock();
                me.carry_out(action);
            });
        if let Err(e) = spawned {
            tracing::error!(domain = %self.id.name, error = %e, ?action, "cannot start a policy thread");
        }
    }

    fn spawn_soft_reset(&self) {
        let Some(me) = self.me.upgrade() else { return };
        let _ = std::thread::Builder::new()
            .name("domkit-libxl-softreset".into())
            .spawn(move || {
                let _op = me.ops.blocking_lock();
                let Some(domid) = me.domid() else { return };
                match me.ctx.soft_reset(&me.libxl_json, domid) {
                    Ok(()) => {
                        if let Err(e) = me.rearm(domid) {
                            tracing::error!(domain = %me.id.name, error = %e, "cannot watch the soft-reset domain");
                        }
                    }
                    Err(e) => {
                        tracing::error!(domain = %me.id.name, error = %e, "soft reset failed: destroying");
                        let _ = me.ctx.destroy(domid);
                        me.disarm();
                        me.feed_fact(Fact::SoftResetFailed);
                    }
                }
            });
    }

    /// Carry out a policy action (the caller holds `ops`).
    fn carry_out(&self, action: PolicyAction) {
        tracing::info!(domain = %self.id.name, ?action, "carrying out policy action");
        match action {
            PolicyAction::Destroy => {
                if let Err(e) = self.destroy_locked() {
                    tracing::error!(domain = %self.id.name, error = %e, "policy destroy failed");
                }
            }
            PolicyAction::Restart => self.restart_locked(),
            // A Xen domain that shut down or crashed is already stopped: keep it.
            PolicyAction::Preserve => {}
        }
    }

    /// Destroy the current Xen domain and feed its end (caller holds `ops`).
    fn destroy_locked(&self) -> std::result::Result<(), LibxlError> {
        if let Some(domid) = self.domid() {
            let t0 = Instant::now();
            match self.ctx.destroy(domid) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "destroyed");
            self.disarm();
        }
        self.feed_fact(Fact::Destroyed);
        Ok(())
    }

    /// Restart: destroy the old domid, create a new one from the same config (same name and
    /// uuid), report `RestartDone` (caller holds `ops`).
    fn restart_locked(&self) {
        let old = {
            let mut b = lock(&self.backend);
            let d = b.domid;
            self.disarm_locked(&mut b);
            d
        };
        if let Some(domid) = old {
            if let Err(e) = self.ctx.destroy(domid) {
                if !e.is_not_found() {
                    tracing::error!(domain = %self.id.name, error = %e, "restart: destroying the old domain failed");
                }
            }
        }
        let t0 = Instant::now();
        let ok = match self.ctx.create_new(&self.libxl_json) {
            Ok(domid) => match self.arm_and_run(domid, false, Fact::RestartDone { ok: true }) {
                Ok(()) => {
                    tracing::info!(domain = %self.id.name, old = ?old, new = domid, ms = t0.elapsed().as_millis() as u64, "restarted");
                    true
                }
                Err(e) => {
                    tracing::error!(domain = %self.id.name, error = %e, "restart: cannot run the new domain");
                    let _ = self.ctx.destroy(domid);
                    false
                }
            },
            Err(e) => {
                tracing::error!(domain = %self.id.name, error = %e, "restart: creating the new domain failed");
                false
            }
        };
        if !ok {
            self.feed_fact(Fact::RestartDone { ok: false });
        }
    }

    // ---- operations (blocking; the caller holds `ops`) ----

    fn start_blocking(&self, options: StartOptions) -> Result<()> {
        if self.cell.state().is_active() {
            return Err(self.invalid(Operation::Start));
        }
        let t0 = Instant::now();
        let domid = match self.ctx.create_new(&self.libxl_json) {
            Ok(d) => d,
            Err(e) => {
                self.feed_fact(Fact::CreateFailed);
                return Err(backend_err(Operation::Start, e));
            }
        };
        let created = Fact::Created {
            how: Creation::Boot,
            paused: options.paused,
        };
        if let Err(e) = self.arm_and_run(domid, options.paused, created) {
            let _ = self.ctx.destroy(domid);
            self.feed_fact(Fact::CreateFailed);
            return Err(backend_err(Operation::Start, e));
        }
        tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "started");
        Ok(())
    }

    fn pause_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Paused(_) => return Ok(()),
            DomainState::Running(_) => {}
            _ => return Err(self.invalid(Operation::Pause)),
        }
        let domid = self.domid().ok_or_else(|| self.invalid(Operation::Pause))?;
        let _intent = self.cell.intent(Intent::Pause);
        self.ctx
            .pause(domid)
            .map_err(|e| backend_err(Operation::Pause, e))?;
        self.feed_fact(Fact::Paused);
        Ok(())
    }

    fn resume_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Running(_) => return Ok(()),
            DomainState::Paused(PausedReason::ShuttingDown) => {
                return Err(self.invalid(Operation::Resume))
            }
            DomainState::Paused(_) => {}
            _ => return Err(self.invalid(Operation::Resume)),
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::Resume))?;
        let _intent = self.cell.intent(Intent::Resume);
        self.ctx
            .unpause(domid)
            .map_err(|e| backend_err(Operation::Resume, e))?;
        self.feed_fact(Fact::Unpaused);
        Ok(())
    }

    fn shutdown_request_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(_)
            | DomainState::Paused(PausedReason::User | PausedReason::Unknown) => {}
            _ => return Err(self.invalid(Operation::Shutdown)),
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::Shutdown))?;
        let _intent = self.cell.intent(Intent::Shutdown);
        let t0 = Instant::now();
        match self.ctx.shutdown(domid) {
            Ok(()) => {
                tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "shutdown request acknowledged by the guest");
                self.feed_fact(Fact::ShutdownAcknowledged);
                Ok(())
            }
            Err(e) if e.code == libxenlight_sys::ERROR_TIMEDOUT => Err(Error::Timeout {
                operation: Operation::Shutdown,
                after: t0.elapsed(),
                hint: format!(
                    "the guest did not acknowledge the PV shutdown request ({e}); is it paused, \
                     or without PV drivers? destroy it to stop it"
                ),
            }),
            Err(e) => Err(backend_err(Operation::Shutdown, e)),
        }
    }

    fn reboot_request_blocking(&self) -> Result<()> {
        match self.cell.state() {
            DomainState::Running(_)
            | DomainState::Blocked(_)
            | DomainState::ShuttingDown(_)
            | DomainState::Paused(PausedReason::User | PausedReason::Unknown) => {}
            _ => return Err(self.invalid(Operation::Reboot)),
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::Reboot))?;
        self.ctx
            .reboot(domid)
            .map_err(|e| backend_err(Operation::Reboot, e))
    }

    fn reset_blocking(&self) -> Result<()> {
        if !self.cell.state().is_active() {
            return Err(self.invalid(Operation::Reset));
        }
        let _intent = self.cell.intent(Intent::Reset);
        match self.feed(TraceInput::Fact(Fact::ResetRequested)) {
            Some(PolicyAction::Restart) => {
                self.restart_locked();
                if self.cell.state().is_running() {
                    Ok(())
                } else {
                    Err(Error::Backend {
                        backend: BACKEND.into(),
                        message: format!(
                            "reset: creating the domain again failed; it is {}",
                            self.cell.state()
                        ),
                    })
                }
            }
            Some(other) => {
                self.carry_out(other);
                Ok(())
            }
            None => Err(self.invalid(Operation::Reset)),
        }
    }

    fn destroy_blocking(&self) -> Result<()> {
        if !self.cell.state().is_active() {
            return Ok(());
        }
        let _intent = self.cell.intent(Intent::Destroy);
        self.destroy_locked()
            .map_err(|e| backend_err(Operation::Destroy, e))
    }

    fn save_blocking(&self, path: &Path) -> Result<()> {
        let was_paused = match self.cell.state() {
            DomainState::Running(_) => false,
            DomainState::Paused(PausedReason::ShuttingDown) => {
                return Err(self.invalid(Operation::Save))
            }
            DomainState::Paused(_) => true,
            _ => return Err(self.invalid(Operation::Save)),
        };
        let domid = self.domid().ok_or_else(|| self.invalid(Operation::Save))?;
        // The temporary file first: an unwritable place fails before the domain is touched.
        let mut target = SaveTarget::create(path).map_err(save_err)?;
        target
            .write_header(&SaveHeader {
                format: savefile::FORMAT,
                backend: BACKEND.into(),
                name: self.id.name.clone(),
                uuid: self.id.uuid,
                was_paused,
                domid,
                saved_at_us: domkit_core::event::unix_micros(SystemTime::now()),
            })
            .map_err(save_err)?;
        let _intent = self.cell.intent(Intent::Save);
        if was_paused {
            // A PV guest suspends itself: it has to run to answer the suspend request.
            self.ctx
                .unpause(domid)
                .map_err(|e| backend_err(Operation::Save, e))?;
        }
        let t0 = Instant::now();
        if let Err(e) = self.ctx.suspend_to_fd(domid, target.raw_fd()) {
            tracing::warn!(domain = %self.id.name, error = %e, "save failed: resuming the domain");
            self.recover_after_failed_save(domid, was_paused);
            return Err(backend_err(Operation::Save, e));
        }
        let saved_ms = t0.elapsed().as_millis() as u64;
        // libxl_domain_suspend returned 0: the guest is suspended.
        self.feed_fact(Fact::Suspended);
        if let Err(e) = target.persist() {
            tracing::warn!(domain = %self.id.name, error = %e, "cannot keep the save file: resuming the domain");
            self.recover_after_failed_save(domid, was_paused);
            return Err(save_err(e));
        }
        match self.ctx.destroy(domid) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                return Err(Error::Backend {
                    backend: BACKEND.into(),
                    message: format!(
                        "save: the state is saved to {} but destroying the suspended domain \
                         failed: {e}; destroy it",
                        path.display()
                    ),
                })
            }
        }
        self.disarm();
        self.feed_fact(Fact::Destroyed);
        tracing::info!(domain = %self.id.name, domid, suspend_ms = saved_ms, total_ms = t0.elapsed().as_millis() as u64, path = %path.display(), "saved");
        Ok(())
    }

    /// After a failed save: if the guest is suspended, resume it (co-operatively) and watch
    /// it afresh; put it back to paused if it was paused.
    fn recover_after_failed_save(&self, domid: u32, was_paused: bool) {
        match self.ctx.domain_info(domid) {
            Ok(info) if info.shutdown && info.shutdown_reason == i32::from(REASON_SUSPEND) => {
                self.feed_fact(Fact::Suspended);
                match self.ctx.resume_cancel(domid) {
                    Ok(()) => {
                        if let Err(e) = self.rearm(domid) {
                            tracing::error!(domain = %self.id.name, error = %e, "cannot watch the resumed domain");
                        }
                        if was_paused {
                            if let Err(e) = self.ctx.pause(domid) {
                                tracing::error!(domain = %self.id.name, error = %e, "cannot pause the resumed domain again");
                            }
                        } else {
                            self.feed_fact(Fact::ResumedAfterFailedSave);
                        }
                    }
                    Err(e) => {
                        tracing::error!(domain = %self.id.name, error = %e, "cannot resume the domain after a failed save: it stays suspended")
                    }
                }
            }
            Ok(_) => {
                if was_paused {
                    if let Err(e) = self.ctx.pause(domid) {
                        tracing::error!(domain = %self.id.name, error = %e, "cannot pause the domain again");
                    }
                }
            }
            Err(e) => {
                tracing::error!(domain = %self.id.name, error = %e, "after a failed save the domain cannot be found")
            }
        }
    }

    fn restore_blocking(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        if self.cell.state().is_active() {
            return Err(self.invalid(Operation::Restore));
        }
        let (file, header) = savefile::open(path).map_err(save_err)?;
        if header.uuid != self.id.uuid || header.name != self.id.name {
            return Err(Error::Protocol {
                message: format!(
                    "{} holds domain {:?} ({}), not {}: restore it through that domain",
                    path.display(),
                    header.name,
                    header.uuid,
                    self.id
                ),
            });
        }
        let paused = options.paused.unwrap_or(header.was_paused);
        let t0 = Instant::now();
        let domid = match self.ctx.create_restore(&self.libxl_json, file.as_raw_fd()) {
            Ok(d) => d,
            Err(e) => {
                self.feed_fact(Fact::CreateFailed);
                return Err(backend_err(Operation::Restore, e));
            }
        };
        drop(file);
        let created = Fact::Created {
            how: Creation::Restore,
            paused,
        };
        if let Err(e) = self.arm_and_run(domid, paused, created) {
            let _ = self.ctx.destroy(domid);
            self.feed_fact(Fact::CreateFailed);
            return Err(backend_err(Operation::Restore, e));
        }
        tracing::info!(domain = %self.id.name, domid, ms = t0.elapsed().as_millis() as u64, "restored");
        Ok(())
    }

    fn pm_suspend_blocking(&self) -> Result<()> {
        if !self.cell.state().is_running() {
            return Err(self.invalid(Operation::PmSuspend));
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::PmSuspend))?;
        let _intent = self.cell.intent(Intent::PmSuspend);
        self.ctx
            .suspend_only(domid)
            .map_err(|e| backend_err(Operation::PmSuspend, e))?;
        self.feed_fact(Fact::SuspendedOnly);
        Ok(())
    }

    fn pm_wakeup_blocking(&self) -> Result<()> {
        if !matches!(self.cell.state(), DomainState::PmSuspended(_)) {
            return Err(self.invalid(Operation::PmWakeup));
        }
        let domid = self
            .domid()
            .ok_or_else(|| self.invalid(Operation::PmWakeup))?;
        self.ctx
            .resume_cancel(domid)
            .map_err(|e| backend_err(Operation::PmWakeup, e))?;
        if let Err(e) = self.rearm(domid) {
            tracing::error!(domain = %self.id.name, error = %e, "cannot watch the woken domain");
        }
        self.feed_fact(Fact::WokeUp);
        Ok(())
    }
}

impl Drop for DomainInner {
    fn drop(&mut self) {
        let b = self.backend.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = b.watch.take() {
            self.registry.remove(w.token());
        }
    }
}

/// A domkit domain on Xen (cheap to clone; clones share the domain).
#[derive(Clone, Debug)]
pub struct LibxlDomain {
    pub(crate) inner: Arc<DomainInner>,
}

/// Clears an intent when dropped (for intents that outlive the blocking call: reboot).
struct OwnedIntent {
    inner: Arc<DomainInner>,
    token: Option<domkit_core::IntentToken>,
}

impl Drop for OwnedIntent {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.inner.cell.with(|l| l.pop_intent(token));
        }
    }
}

impl LibxlDomain {
    /// The current Xen domid (changes on every restart and restore); `None` when shut off.
    pub fn domid(&self) -> Option<u32> {
        self.inner.domid()
    }

    /// The config this domain was defined with (its uuid filled in).
    pub fn config(&self) -> &DomainConfig {
        &self.inner.config
    }

    /// libxl's JSON domain config the driver creates this domain from.
    pub fn libxl_json(&self) -> &str {
        &self.inner.libxl_json
    }

    /// Diagnostics: what the driver fed the state machine (libxl events of the current watch
    /// and facts from returned calls, with the intent in force), oldest first.
    pub fn trace(&self) -> Vec<TraceEntry> {
        lock(&self.inner.trace).clone()
    }

    /// Run `f` on a blocking thread under this domain's operation lock.
    async fn run_op<T: Send + 'static>(
        &self,
        operation: Operation,
        f: impl FnOnce(&DomainInner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let guard = self.inner.ops.clone().lock_owned().await;
        let inner = self.inner.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let broken = inner.ctx.broken();
            if broken.is_none() {
                inner.cell.set_control(ControlState::Job { operation });
            }
            let r = f(&inner);
            match broken.or_else(|| inner.ctx.broken()) {
                Some(reason) => inner.cell.set_control(ControlState::Broken { reason }),
                None => inner.cell.set_control(ControlState::Ok),
            }
            r
        });
        job.await.map_err(|e| Error::Backend {
            backend: BACKEND.into(),
            message: format!("{operation}: the blocking libxl call panicked or was cancelled: {e}"),
        })?
    }

    fn check_mode(&self, operation: Operation, mode: ShutdownMode) -> Result<()> {
        match mode {
            ShutdownMode::Default | ShutdownMode::Paravirt => Ok(()),
            ShutdownMode::Acpi => Err(Error::Unsupported {
                operation,
                backend: BACKEND.into(),
                reason: "ACPI power button: Xen PV/PVH guests have no ACPI power button \
                         (libxl_send_trigger POWER is HVM-only); use the default \
                         (paravirtual) mode"
                    .into(),
            }),
            ShutdownMode::Agent => Err(Error::Unsupported {
                operation,
                backend: BACKEND.into(),
                reason: "guest agent: the libxl driver does not talk to a guest agent; use the \
                         default (paravirtual) mode"
                    .into(),
            }),
        }
    }
}

#[async_trait]
impl Domain for LibxlDomain {
    fn id(&self) -> &DomainId {
        &self.inner.id
    }

    fn state(&self) -> DomainState {
        self.inner.cell.state()
    }

    async fn info(&self) -> Result<DomainInfo> {
        Ok(DomainInfo {
            id: self.inner.id.clone(),
            state: self.inner.cell.state(),
            control: self.inner.cell.control(),
            vcpus: self.inner.config.vcpus,
            memory_mib: self.inner.config.memory_mib,
            backend_handle: self.domid().map(|d| format!("domid {d}")),
        })
    }

    fn subscribe(&self) -> EventStream {
        self.inner.cell.subscribe()
    }

    async fn start(&self, options: StartOptions) -> Result<()> {
        self.run_op(Operation::Start, move |d| d.start_blocking(options))
            .await
    }

    async fn pause(&self) -> Result<()> {
        self.run_op(Operation::Pause, |d| d.pause_blocking()).await
    }

    async fn resume(&self) -> Result<()> {
        self.run_op(Operation::Resume, |d| d.resume_blocking())
            .await
    }

    async fn shutdown(&self, options: ShutdownOptions) -> Result<ShutdownOutcome> {
        self.check_mode(Operation::Shutdown, options.mode)?;
        let t0 = Instant::now();
        let requested = self
            .run_op(Operation::Shutdown, |d| d.shutdown_request_blocking())
            .await;
        match requested {
            Ok(()) => {}
            Err(Error::Timeout { .. }) if options.destroy_on_timeout => {
                self.destroy().await?;
                return Ok(ShutdownOutcome::Destroyed);
            }
            Err(e) => return Err(e),
        }
        if options.wait == ShutdownWait::Acknowledged {
            return Ok(ShutdownOutcome::Acknowledged);
        }
        let left = options.timeout.saturating_sub(t0.elapsed());
        match self
            .inner
            .cell
            .wait_for(Operation::Shutdown, left, |s| s.is_shutoff())
            .await
        {
            Ok(_) => Ok(ShutdownOutcome::Completed),
            Err(e) => {
                if options.destroy_on_timeout {
                    tracing::info!(domain = %self.inner.id.name, "shutdown timed out: destroying");
                    self.destroy().await?;
                    Ok(ShutdownOutcome::Destroyed)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn reboot(&self, mode: ShutdownMode, timeout: Duration) -> Result<()> {
        self.check_mode(Operation::Reboot, mode)?;
        let t0 = Instant::now();
        let mut events = self.subscribe();
        let token = self.inner.cell.with(|l| l.push_intent(Intent::Reboot));
        let _intent = OwnedIntent {
            inner: self.inner.clone(),
            token: Some(token),
        };
        self.run_op(Operation::Reboot, |d| d.reboot_request_blocking())
            .await?;
        let rebooted = async {
            while let Some(ev) = events.next().await {
                if ev.kind == EventKind::Rebooted {
                    return true;
                }
            }
            false
        };
        let left = timeout.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, rebooted).await {
            Ok(true) => {}
            _ => {
                return Err(Error::Timeout {
                    operation: Operation::Reboot,
                    after: timeout,
                    hint: format!(
                        "the guest acknowledged the reboot request but did not reboot; it is {}",
                        self.state()
                    ),
                })
            }
        }
        let inner = self.inner.clone();
        let left = timeout
            .saturating_sub(t0.elapsed())
            .max(Duration::from_secs(1));
        let state = self
            .inner
            .cell
            .wait_for(Operation::Reboot, left, move |_| {
                !inner.cell.with(|l| l.is_restarting())
            })
            .await?;
        if state.is_active() {
            Ok(())
        } else {
            Err(Error::Backend {
                backend: BACKEND.into(),
                message: format!("reboot: creating the domain again failed; it is {state}"),
            })
        }
    }

    async fn reset(&self) -> Result<()> {
        self.run_op(Operation::Reset, |d| d.reset_blocking()).await
    }

    async fn destroy(&self) -> Result<()> {
        self.run_op(Operation::Destroy, |d| d.destroy_blocking())
            .await
    }

    async fn save(&self, path: &Path) -> Result<()> {
        let path = path.to_path_buf();
        self.run_op(Operation::Save, move |d| d.save_blocking(&path))
            .await
    }

    async fn restore(&self, path: &Path, options: RestoreOptions) -> Result<()> {
        let path = path.to_path_buf();
        self.run_op(Operation::Restore, move |d| {
            d.restore_blocking(&path, options)
        })
        .await
    }

    async fn pm_suspend(&self, target: PmSuspendTarget) -> Result<()> {
        if target == PmSuspendTarget::Disk {
            return Err(Error::Unsupported {
                operation: Operation::PmSuspend,
                backend: BACKEND.into(),
                reason: "suspend to disk (S4): libxl has no guest hibernation request for \
                         PV/PVH guests; use save() to keep the state in a file"
                    .into(),
            });
        }
        self.run_op(Operation::PmSuspend, |d| d.pm_suspend_blocking())
            .await
    }

    async fn pm_wakeup(&self) -> Result<()> {
        self.run_op(Operation::PmWakeup, |d| d.pm_wakeup_blocking())
            .await
    }
}
