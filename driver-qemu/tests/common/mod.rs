//! Helpers shared by the QMP and guest agent client tests.

/// Assert that no process whose name `matches` has this test process as its parent (a leaked
/// QEMU or qemu-ga). Reads `/proc/*/stat`: `pid (comm) state ppid ...`, where comm may
/// contain spaces, so the fields are split after the last `)`.
pub fn assert_no_children(what: &str, matches: impl Fn(&str) -> bool) {
    let me = std::process::id().to_string();
    let mut leaked = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let ppid = tail.split_whitespace().nth(1).unwrap_or("");
        if ppid == me && matches(comm) {
            leaked.push(entry.file_name());
        }
    }
    assert!(leaked.is_empty(), "leaked {what} children: {leaked:?}");
}
