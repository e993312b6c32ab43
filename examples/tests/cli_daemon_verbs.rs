//! The `domkit` binary's domkitd verbs without a daemon: they are listed with their exit
//! codes, and an unreachable daemon is exit code 7 with a message naming the socket. (The
//! verbs against a real domkitd are tested in daemon/tests/lifecycle.rs, which runs this
//! binary; having a test here makes `cargo test --workspace` build it.)

use std::process::Command;

fn domkit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_domkit"))
        .args(args)
        .output()
        .expect("run domkit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_verbs_and_the_exit_codes() {
    let (code, out, _) = domkit(&["--help"]);
    assert_eq!(code, 0);
    for verb in [
        "define", "undefine", "list", "start", "shutdown", "reboot", "reset", "destroy", "suspend",
        "resume", "save", "restore", "dominfo", "domstate", "event",
    ] {
        assert!(
            out.contains(&format!("  {verb} ")),
            "{verb} missing from --help:\n{out}"
        );
    }
    assert!(out.contains("3 not_found"), "{out}");
}

#[test]
fn an_unreachable_daemon_is_exit_code_7_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let socket = socket.display().to_string();
    let (code, _, err) = domkit(&["--socket", &socket, "list"]);
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains(&format!("cannot reach domkitd at unix://{socket}")),
        "{err}"
    );
    let (code, _, err) = domkit(&["-c", "ftp://x", "list"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_closed_stdout_pipe_ends_the_listing_quietly() {
    use std::process::Stdio;
    // stdout is a pipe whose reader is already gone (like `| head -n 0`): every write
    // fails with EPIPE, deterministically.
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_domkit"))
        .args(["conformance", "--list"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run domkit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{}: {err}", out.status);
}

#[test]
fn completions_for_bash_zsh_fish_complete_the_verbs_and_options() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = domkit(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["shutdown", "dominfo", "destroy-on-timeout", "completions"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, _, err) = domkit(&["completions", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
    // The bash script, sourced in a real bash, completes a verb and an option.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("domkit.bash");
    std::fs::write(&script, domkit(&["completions", "bash"]).1).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(
            r#"source "$1"
COMP_WORDS=(domkit shut); COMP_CWORD=1; _domkit domkit shut domkit; echo "[${COMPREPLY[*]}]"
COMP_WORDS=(domkit shutdown vm --wa); COMP_CWORD=3; _domkit domkit --wa vm; echo "[${COMPREPLY[*]}]""#,
        )
        .arg("bash")
        .arg(&script)
        .output()
        .expect("run bash");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["[shutdown]", "[--wait]"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
