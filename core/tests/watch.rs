//! §12: watching a domain. `subscribe_from` (replay without gap or duplicate, a typed answer
//! for what is no longer kept), `wait_for` (filters, timeout, a lagging stream), and the
//! console hub (several readers, one writer, the end of the stream).

use domkit_core::cell::EVENT_BUFFER;
use domkit_core::{
    ConsoleAccess, ConsoleHub, Creation, DomainId, Error, EventFilter, EventKind, EventName,
    Intent, Lifecycle, LifecycleCell, LifecyclePolicies, Observation, Operation, StartedDetail,
    StopCause, SuspendedDetail,
};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn running_cell() -> Arc<LifecycleCell> {
    let id = DomainId {
        name: "watch".into(),
        uuid: uuid::Uuid::nil(),
    };
    let cell = LifecycleCell::new(Lifecycle::new(id, LifecyclePolicies::default()), None);
    cell.observe(Observation::Created {
        how: Creation::Boot,
        paused: false,
    });
    Arc::new(cell)
}

/// One pause (`suspended(paused)`) and one resume (`resumed(unpaused)`): two events.
fn pause_resume(cell: &LifecycleCell) {
    {
        let _pause = cell.intent(Intent::Pause);
        cell.observe(Observation::CpusStopped {
            cause: StopCause::Command,
        });
    }
    cell.observe(Observation::CpusResumed);
}

async fn next_seqs(events: &mut domkit_core::EventStream, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for _ in 0..n {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        seqs.push(ev.seq);
    }
    seqs
}

#[tokio::test]
async fn s12_1_subscribe_from_replays_the_kept_events_then_the_live_ones_once() {
    let cell = running_cell(); // seq 1: started(booted)
    pause_resume(&cell); // 2, 3
    pause_resume(&cell); // 4, 5
    let mut events = cell.subscribe_from(2).expect("kept");
    pause_resume(&cell); // 6, 7
    assert_eq!(next_seqs(&mut events, 5).await, vec![3, 4, 5, 6, 7]);
    assert_eq!(events.lost(), 0);
    // Nothing else (no duplicate of a replayed event).
    assert!(
        tokio::time::timeout(Duration::from_millis(50), events.next())
            .await
            .is_err(),
        "an event beyond the last one"
    );
}

#[tokio::test]
async fn s12_1_subscribe_from_the_last_seq_or_beyond_starts_after_it() {
    let cell = running_cell();
    pause_resume(&cell); // 2, 3
    let mut at_last = cell.subscribe_from(3).expect("now");
    let mut ahead = cell.subscribe_from(4).expect("ahead");
    pause_resume(&cell); // 4, 5
    assert_eq!(next_seqs(&mut at_last, 2).await, vec![4, 5]);
    assert_eq!(next_seqs(&mut ahead, 1).await, vec![5]);
    // From 0 while everything is still kept: the whole history.
    let mut all = cell.subscribe_from(0).expect("all kept");
    assert_eq!(next_seqs(&mut all, 5).await, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn s12_2_subscribe_from_beyond_what_is_kept_names_the_missing_range() {
    let cell = running_cell();
    for _ in 0..EVENT_BUFFER {
        pause_resume(&cell);
    }
    let last = cell.with(|l| l.last_seq());
    assert_eq!(last, 1 + 2 * EVENT_BUFFER as u64);
    let oldest_kept = last - EVENT_BUFFER as u64 + 1;
    match cell.subscribe_from(3) {
        Err(Error::EventsLost {
            domain,
            after,
            resumed_at,
        }) => {
            assert_eq!(domain, "watch");
            assert_eq!(after, 3);
            assert_eq!(resumed_at, oldest_kept);
        }
        other => panic!("want events_lost, got {other:?}"),
    }
    // The oldest kept one's predecessor is still enough.
    let mut events = cell
        .subscribe_from(oldest_kept - 1)
        .expect("the oldest kept is next");
    let seqs = next_seqs(&mut events, EVENT_BUFFER).await;
    assert_eq!(seqs, (oldest_kept..=last).collect::<Vec<_>>());
    let message = Error::EventsLost {
        domain: "watch".into(),
        after: 3,
        resumed_at: 10,
    }
    .to_string();
    assert!(message.contains("seq 4..=9"), "{message}");
}

#[tokio::test]
async fn s12_1_snapshot_then_a_burst_from_another_thread_every_event_once() {
    for _ in 0..50 {
        let cell = running_cell();
        let racer = {
            let cell = cell.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    pause_resume(&cell);
                }
            })
        };
        std::thread::yield_now();
        let (_, seq, mut events) = cell.snapshot_and_subscribe();
        racer.join().expect("racer");
        let last = cell.with(|l| l.last_seq());
        let seqs = next_seqs(&mut events, (last - seq) as usize).await;
        assert_eq!(seqs, (seq + 1..=last).collect::<Vec<_>>());
        // And resuming from the middle of what this subscriber saw replays the rest.
        if let Some(mid) = seqs.get(seqs.len() / 2) {
            let mut again = cell.subscribe_from(*mid).expect("kept");
            let rest = next_seqs(&mut again, (last - mid) as usize).await;
            assert_eq!(rest, (mid + 1..=last).collect::<Vec<_>>());
        }
    }
}

#[tokio::test]
async fn s12_3_wait_for_skips_what_the_filter_refuses() {
    let cell = running_cell();
    let filters = [
        EventFilter::Kind(EventKind::Resumed(domkit_core::ResumedDetail::Unpaused)),
        EventFilter::Name(EventName::Resumed),
        EventFilter::AnyOf(vec![
            EventKind::Started(StartedDetail::Restored),
            EventKind::Resumed(domkit_core::ResumedDetail::Unpaused),
        ]),
        EventFilter::matching(|e| matches!(e.kind, EventKind::Resumed(_)) && !e.reconciled),
    ];
    for filter in filters {
        let (_, seq, mut events) = cell.snapshot_and_subscribe();
        pause_resume(&cell);
        let ev = events
            .wait_for(&filter, Duration::from_secs(5))
            .await
            .expect("matched");
        assert_eq!(
            ev.kind,
            EventKind::Resumed(domkit_core::ResumedDetail::Unpaused)
        );
        assert_eq!(ev.seq, seq + 2, "{filter}");
    }
    let (_, _, mut events) = cell.snapshot_and_subscribe();
    pause_resume(&cell);
    let any = events
        .wait_for(&EventFilter::Any, Duration::from_secs(5))
        .await
        .expect("any");
    assert_eq!(any.kind, EventKind::Suspended(SuspendedDetail::Paused));
}

#[tokio::test]
async fn s12_3_wait_for_times_out_with_a_typed_error() {
    let cell = running_cell();
    let mut events = cell.subscribe();
    pause_resume(&cell);
    let started = std::time::Instant::now();
    let err = events
        .wait_for(
            &EventFilter::Name(EventName::Stopped),
            Duration::from_millis(200),
        )
        .await
        .expect_err("no stop");
    assert!(started.elapsed() >= Duration::from_millis(200));
    match err {
        Error::Timeout {
            operation, hint, ..
        } => {
            assert_eq!(operation, Operation::WaitEvent);
            assert!(hint.contains("stopped"), "{hint}");
        }
        other => panic!("want timeout, got {other}"),
    }
}

#[tokio::test]
async fn s12_2_wait_for_on_a_stream_that_lagged_is_events_lost() {
    let cell = running_cell();
    let mut events = cell.subscribe();
    for _ in 0..EVENT_BUFFER {
        pause_resume(&cell); // 256 events: the oldest 128 dropped for this subscriber
    }
    let err = events
        .wait_for(
            &EventFilter::Name(EventName::Stopped),
            Duration::from_secs(5),
        )
        .await
        .expect_err("lagged");
    match err {
        Error::EventsLost { resumed_at, .. } => {
            assert_eq!(resumed_at, 2 + EVENT_BUFFER as u64);
            assert_eq!(events.lost(), EVENT_BUFFER as u64);
        }
        other => panic!("want events_lost, got {other}"),
    }
}

#[tokio::test]
async fn s12_3_wait_for_a_stream_that_ends_is_not_found() {
    let cell = running_cell();
    let mut events = cell.subscribe();
    drop(cell);
    let err = events
        .wait_for(&EventFilter::Any, Duration::from_secs(5))
        .await
        .expect_err("ended");
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn s12_4_console_several_readers_one_writer_end_when_closed() {
    let (hub, mut input) = ConsoleHub::new("web1");
    let mut reader_a = hub.open(ConsoleAccess::ReadOnly).expect("reader");
    let mut writer = hub.open(ConsoleAccess::ReadWrite).expect("writer");
    match hub.open(ConsoleAccess::ReadWrite) {
        Err(Error::Busy { what, .. }) => assert!(what.contains("web1"), "{what}"),
        other => panic!("want busy, got {other:?}"),
    }
    hub.publish(b"login: ");
    let mut buf = [0u8; 7];
    reader_a.read_exact(&mut buf).await.expect("a reads");
    assert_eq!(&buf, b"login: ");
    writer.read_exact(&mut buf).await.expect("the writer reads");
    assert_eq!(&buf, b"login: ");

    writer.write_all(b"root\n").await.expect("write");
    assert_eq!(input.recv().await.expect("typed").as_ref(), b"root\n");
    let err = reader_a.write_all(b"x").await.expect_err("read-only");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);

    // The writer slot is free again once the writer is gone.
    drop(writer);
    let mut second = hub.open(ConsoleAccess::ReadWrite).expect("free again");

    hub.close();
    let mut rest = Vec::new();
    reader_a.read_to_end(&mut rest).await.expect("eof");
    assert!(rest.is_empty());
    drop(input);
    let err = second.write_all(b"x").await.expect_err("closed");
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(matches!(
        hub.open(ConsoleAccess::ReadOnly),
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn s12_4_a_console_reader_that_lags_loses_the_oldest_bytes_bounded() {
    use domkit_core::console::CONSOLE_BUFFER_BYTES;
    let (hub, _input) = ConsoleHub::new("web1");
    let mut reader = hub.open(ConsoleAccess::ReadOnly).expect("reader");
    // A serial port writes a byte at a time: the ring counts bytes, not writes.
    let total = CONSOLE_BUFFER_BYTES + 1000;
    for i in 0..total {
        hub.publish(&[b'a' + (i % 26) as u8]);
    }
    let mut first = [0u8; 1];
    reader.read_exact(&mut first).await.expect("a byte");
    assert_eq!(reader.lost_bytes(), 1000);
    assert_eq!(first[0], b'a' + (1000 % 26) as u8);
    // One write larger than the ring: only its end is kept.
    let late = hub.open(ConsoleAccess::ReadOnly).expect("late reader");
    let mut late = late;
    let huge: Vec<u8> = (0..CONSOLE_BUFFER_BYTES * 2)
        .map(|i| (i % 251) as u8)
        .collect();
    hub.publish(&huge);
    hub.close();
    let mut all = Vec::new();
    late.read_to_end(&mut all).await.expect("eof");
    assert_eq!(all.len(), CONSOLE_BUFFER_BYTES);
    assert_eq!(all[..], huge[CONSOLE_BUFFER_BYTES..]);
    assert_eq!(late.lost_bytes(), CONSOLE_BUFFER_BYTES as u64);
    // The early reader reads what is left, then the end.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).await.expect("eof");
    assert_eq!(rest[..], huge[CONSOLE_BUFFER_BYTES..]);
}

#[tokio::test]
async fn s12_4_a_waiting_reader_wakes_on_publish_and_on_close() {
    let (hub, _input) = ConsoleHub::new("web1");
    let hub = Arc::new(hub);
    let mut reader = hub.open(ConsoleAccess::ReadOnly).expect("reader");
    let publisher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            hub.publish(b"late output");
            tokio::time::sleep(Duration::from_millis(50)).await;
            hub.close();
        })
    };
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut all))
        .await
        .expect("woken")
        .expect("eof");
    assert_eq!(all, b"late output");
    publisher.await.expect("publisher");
}
