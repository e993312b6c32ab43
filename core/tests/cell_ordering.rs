//! §2.4: events of a domain reach every subscriber in `seq` order, `state()` is never older
//! than the last event delivered, and `snapshot_and_subscribe` has no gap and no duplicate,
//! with several observers at once (a backend's event thread and an operation, say).

use domkit_core::{
    DomainId, DomainState, Intent, Lifecycle, LifecycleCell, LifecyclePolicies, Observation,
    StopCause,
};
use futures::StreamExt;
use std::sync::Arc;

fn running_cell() -> Arc<LifecycleCell> {
    let id = DomainId {
        name: "ordering".into(),
        uuid: uuid::Uuid::nil(),
    };
    let cell = LifecycleCell::new(Lifecycle::new(id, LifecyclePolicies::default()), None);
    cell.observe(Observation::Created {
        how: domkit_core::Creation::Boot,
        paused: false,
    });
    Arc::new(cell)
}

/// Two threads toggling the vCPUs at once: each observation that changes the state emits
/// one event.
fn race(cell: &Arc<LifecycleCell>, per_thread: usize) {
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let cell = cell.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    if (i + t) % 2 == 0 {
                        let _pause = cell.intent(Intent::Pause);
                        cell.observe(Observation::CpusStopped {
                            cause: StopCause::Command,
                        });
                    } else {
                        cell.observe(Observation::CpusResumed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("observer thread");
    }
}

#[tokio::test]
async fn concurrent_observers_deliver_events_in_seq_order() {
    for _ in 0..200 {
        let cell = running_cell();
        let mut events = cell.subscribe();
        race(&cell, 50); // at most 100 events: within the 128-slot ring
        let last = cell.with(|l| l.last_seq());
        let mut seqs = Vec::new();
        while seqs.last() != Some(&last) {
            seqs.push(events.next().await.expect("event").seq);
        }
        let want: Vec<u64> = (seqs[0]..=last).collect();
        assert_eq!(seqs, want, "seqs out of order or with a gap");
        assert_eq!(events.lost(), 0);
    }
}

#[tokio::test]
async fn state_is_never_older_than_the_last_event_delivered() {
    for _ in 0..200 {
        let cell = running_cell();
        let mut events = cell.subscribe();
        let racer = {
            let cell = cell.clone();
            std::thread::spawn(move || race(&cell, 40))
        };
        // Each event delivered: the state now is at least as new, so if no other event
        // follows, the state is the one that event produced.
        let mut last_kind = None;
        let mut last_seen = 0;
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_millis(20), events.next());
            match next.await {
                Ok(Some(ev)) => {
                    assert!(
                        cell.with(|l| l.last_seq()) >= ev.seq,
                        "state older than an event delivered"
                    );
                    last_seen = ev.seq;
                    last_kind = Some(ev.kind);
                }
                Ok(None) => break,
                Err(_) if racer.is_finished() && cell.with(|l| l.last_seq()) == last_seen => break,
                Err(_) => {}
            }
        }
        racer.join().expect("racer");
        let state = cell.state();
        match last_kind {
            Some(domkit_core::EventKind::Suspended(_)) => {
                assert!(matches!(state, DomainState::Paused(_)), "{state}")
            }
            Some(domkit_core::EventKind::Resumed(_)) => {
                assert!(matches!(state, DomainState::Running(_)), "{state}")
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn snapshot_then_stream_has_no_gap_and_no_duplicate() {
    for _ in 0..200 {
        let cell = running_cell();
        let racer = {
            let cell = cell.clone();
            std::thread::spawn(move || race(&cell, 50))
        };
        std::thread::yield_now();
        let (_state, seq, mut events) = cell.snapshot_and_subscribe();
        racer.join().expect("racer");
        let last = cell.with(|l| l.last_seq());
        let mut expect = seq + 1;
        while expect <= last {
            let ev = events.next().await.expect("event");
            assert_eq!(
                ev.seq, expect,
                "gap or duplicate after the snapshot at {seq}"
            );
            expect += 1;
        }
    }
}
