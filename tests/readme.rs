//! The README is code: every `sh` block after "## A short tour" is run,
//! literally, against a `lightbox dev`, with `lightbox` on the `PATH` (as
//! `cargo install --path .` puts it there) and `cargo run --release --`
//! meaning that binary. A command that stops working, or stops doing what
//! the text says, breaks the build.
//!
//! The one thing changed is the ports: the default ones (50051–50053, 8080)
//! lie in the range the system hands out to other sockets, so the dev runs
//! on free ones, the README's are replaced by them in the commands, and the
//! tools find them the way the README says they can: `LIGHTBOX_USERS_ADDR`
//! and its siblings, which `lightbox dev` listens by too.
//!
//! What a command must do is read from its trailing comment: `# ABORTED`
//! (or another gRPC code in capitals) — it fails with that code; `(exit N)`
//! — it exits N; a few phrases the text uses — the output shows it;
//! anything else — it succeeds. Streams (watches, the SSE route) run for a
//! moment and must have shown their first frames. `ID`, `CONTRACT_ID` and
//! `PHOTO_ID` are the ids the text says: the ones the walkthrough's first
//! commands print.

use std::{collections::HashMap, io::Write, path::Path, process::Stdio, time::Duration};

use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

/// The default ports the README uses, and the variable that moves each.
const PORTS: [(u16, &str); 5] = [
    (50050, "LIGHTBOX_ADMIN_ADDR"),
    (50051, "LIGHTBOX_USERS_ADDR"),
    (50052, "LIGHTBOX_CONTRACTS_ADDR"),
    (50053, "LIGHTBOX_PHOTOS_ADDR"),
    (8080, "LIGHTBOX_GATEWAY_ADDR"),
];

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|err| panic!("{err}"))
}

/// One command of the README, as written, and what the text says of it.
#[derive(Debug)]
struct Step {
    /// The command (continuation lines joined, comments removed).
    command: String,
    /// Its trailing comment, if any.
    comment: String,
}

/// The commands of every `sh` block after "## A short tour".
fn steps(readme: &str) -> Vec<Step> {
    let tour = readme.split_once("## A short tour").map_or("", |(_, rest)| rest);
    let mut steps = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in tour.lines() {
        if line.starts_with("```") {
            in_block = line.trim() == "```sh";
            pending.clear();
            continue;
        }
        if !in_block || (pending.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#'))) {
            continue;
        }
        if !pending.is_empty() {
            pending.push('\n');
        }
        pending.push_str(line);
        let (code, comment) = split_comment(&pending);
        if quotes_open(&code) || code.trim_end().ends_with('\\') {
            continue;
        }
        steps.push(Step {
            command: code.trim().to_owned(),
            comment: comment.trim().to_owned(),
        });
        pending.clear();
    }
    steps
}

/// Whether a single or double quote is still open in `text`.
fn quotes_open(text: &str) -> bool {
    let (mut single, mut double) = (false, false);
    for c in text.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            _ => {}
        }
    }
    single || double
}

/// `text` split at its first `#` outside quotes that follows a space.
fn split_comment(text: &str) -> (String, String) {
    let (mut single, mut double, mut previous) = (false, false, ' ');
    for (at, c) in text.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => {
                return (text[..at].to_owned(), text[at + 1..].to_owned());
            }
            _ => {}
        }
        previous = c;
    }
    (text.to_owned(), String::new())
}

/// The UUIDs in `text`, in order.
fn uuids(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let shape = |i: usize| -> bool {
        bytes.get(i..i + 36).is_some_and(|b| {
            b.iter().enumerate().all(|(k, c)| match k {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            })
        })
    };
    (0..bytes.len())
        .filter(|&i| shape(i) && (i == 0 || !bytes[i - 1].is_ascii_hexdigit()))
        .filter_map(|i| text.get(i..i + 36).map(str::to_owned))
        .collect()
}

/// `command` with the placeholders the text names filled in.
fn filled(command: &str, ids: &HashMap<&'static str, String>) -> String {
    command
        .split(' ')
        .map(|word| ids.get(word).cloned().unwrap_or_else(|| word.to_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the text says a command does.
#[derive(Debug, PartialEq)]
enum Expect {
    /// It succeeds.
    Success,
    /// It fails with this gRPC code (grpcurl writes it in CamelCase).
    Code(String),
    /// It exits with this code.
    Exit(i32),
}

fn expectation(comment: &str) -> Expect {
    if let Some(code) = comment.split("(exit ").nth(1).and_then(|rest| rest.split(')').next())
        && let Ok(code) = code.trim().parse()
    {
        return Expect::Exit(code);
    }
    let first = comment.split([',', ' ']).next().unwrap_or_default();
    if first.len() > 3 && first.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        let camel: String = first
            .split('_')
            .map(|part| {
                let lower = part.to_ascii_lowercase();
                let mut chars = lower.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect();
        return Expect::Code(camel);
    }
    Expect::Success
}

/// What must show in a command's output, by the words of its comment.
fn shows(comment: &str) -> Option<&'static str> {
    [
        ("flagged as cached", "SOURCE_CACHE"),
        ("disconnected since", "STREAM_STATE_DISCONNECTED"),
        ("quota from the cached contract", "Offline upload"),
    ]
    .into_iter()
    .find(|(words, _)| comment.contains(words))
    .map(|(_, shown)| shown)
}

/// Whether a command streams until stopped.
fn streams(command: &str) -> bool {
    (command.contains("grpcurl") && command.contains("/Watch"))
        || command.contains("curl -N")
        || command.contains("lightbox watch")
}

fn tool_missing(tool: &str, required_by: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        || std::process::Command::new(tool)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
    if found {
        return false;
    }
    if std::env::var(required_by).is_ok_and(|v| v == "1") {
        panic!("{tool} is required ({required_by}=1) but not on PATH");
    }
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: README tests SKIPPED: {tool} is not on PATH."
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_readme_works_as_written() {
    if tool_missing("grpcurl", "LIGHTBOX_REQUIRE_GRPCURL") || tool_missing("curl", "LIGHTBOX_REQUIRE_GRPCURL") {
        return;
    }
    let ports: Vec<(u16, u16, &str)> = PORTS.iter().map(|(readme, var)| (*readme, free_port(), *var)).collect();
    let mut env: HashMap<String, String> = ports
        .iter()
        .map(|(_, port, var)| ((*var).to_owned(), format!("127.0.0.1:{port}")))
        .collect();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .unwrap_or_else(|err| panic!("README.md: {err}"));
    let steps = steps(&readme);
    assert!(steps.len() > 20, "the README's commands were found: {steps:?}");

    let data = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let mut dev = Command::new(BIN)
        .args(["dev", "--data-dir"])
        .arg(data.path())
        .envs(&env)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start lightbox dev: {err}"));
    lightbox_testkit::eventually("lightbox dev to listen on its ports", || async {
        let mut all = true;
        for (_, port, _) in &ports {
            all &= tokio::net::TcpStream::connect(("127.0.0.1", *port)).await.is_ok();
        }
        all.then_some(())
    })
    .await;

    let bin_dir = Path::new(BIN).parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut ids: HashMap<&'static str, String> = HashMap::new();
    for step in &steps {
        let mut command = filled(&step.command, &ids).replace("cargo run --release --", "lightbox");
        for (readme, port, _) in &ports {
            for host in ["127.0.0.1", "localhost"] {
                command = command.replace(&format!("{host}:{readme}"), &format!("{host}:{port}"));
            }
        }
        assert!(
            !command
                .split(' ')
                .any(|w| matches!(w, "ID" | "CONTRACT_ID" | "PHOTO_ID")),
            "{command}: the README uses an id before saying which"
        );
        if let Some((name, value)) = command.strip_prefix("export ").and_then(|rest| rest.split_once('=')) {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf '%s' {value}"))
                .env("PATH", &path)
                .envs(&env)
                .output()
                .unwrap_or_else(|err| panic!("{command}: {err}"));
            let value = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && !value.is_empty(),
                "{command}: nothing to export"
            );
            env.insert(name.to_owned(), value);
            continue;
        }
        let mut child = Command::new("sh");
        // `exec`: the command is the shell's process, so stopping it stops
        // the command (a stream would outlive its shell otherwise).
        child
            .arg("-c")
            .arg(format!("exec {command}"))
            .env("PATH", &path)
            .envs(&env)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let (status, output) = if streams(&command) {
            // Runs until stopped: a moment is enough to see its first frames.
            let mut child = child
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|err| panic!("{command}: {err}"));
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = child.start_kill();
            let out = child
                .wait_with_output()
                .await
                .unwrap_or_else(|err| panic!("{command}: {err}"));
            let output = String::from_utf8_lossy(&out.stdout).into_owned();
            let seen = ["snapshotBegin", "\"change\"", "event: ", "revision"]
                .iter()
                .any(|frame| output.contains(frame));
            assert!(seen, "{command}: the stream showed nothing in 2 s: {output}");
            continue;
        } else {
            let out = tokio::time::timeout(Duration::from_secs(30), child.output())
                .await
                .unwrap_or_else(|_| panic!("{command}: no answer in 30 s"))
                .unwrap_or_else(|err| panic!("{command}: {err}"));
            let output = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            (out.status.code(), output)
        };
        match expectation(&step.comment) {
            Expect::Success => assert_eq!(status, Some(0), "{command}\n{output}"),
            Expect::Exit(code) => assert_eq!(status, Some(code), "{command}: the README says exit {code}\n{output}"),
            Expect::Code(code) => assert!(
                status != Some(0) && output.contains(&code),
                "{command}: the README says it fails with {code}\n{output}"
            ),
        }
        if let Some(shown) = shows(&step.comment) {
            assert!(
                output.contains(shown),
                "{command}: the README says it shows {shown}\n{output}"
            );
        }
        // The walkthrough's ids, as the text says: the first command prints
        // the user (and, with --plan, their contract); a photo's create, its id.
        if command.starts_with("lightbox users create") && command.contains("--plan") {
            let found = uuids(&output);
            ids.insert("ID", found.first().cloned().unwrap_or_default());
            ids.insert("CONTRACT_ID", found.get(1).cloned().unwrap_or_default());
        } else if command.starts_with("lightbox photos create") && !ids.contains_key("PHOTO_ID") {
            ids.insert("PHOTO_ID", uuids(&output).first().cloned().unwrap_or_default());
        }
    }
    let _ = dev.start_kill();
    let _ = dev.wait().await;
}

#[test]
fn commands_are_read_as_a_shell_would() {
    let readme = "## A short tour\n```sh\n# a comment\ngrpcurl -d '{\"a\": 1,\n  \"b\": 2}' \\\n  host m   # ABORTED\nlightbox x --name \"A # B\"   # refused (exit 5)\n```\n```text\nnot run\n```\n";
    let steps = steps(readme);
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0].command, "grpcurl -d '{\"a\": 1,\n  \"b\": 2}' \\\n  host m");
    assert_eq!(expectation(&steps[0].comment), Expect::Code("Aborted".into()));
    assert_eq!(steps[1].command, "lightbox x --name \"A # B\"");
    assert_eq!(expectation(&steps[1].comment), Expect::Exit(5));
    assert_eq!(
        expectation("DEADLINE_EXCEEDED, after 1 s"),
        Expect::Code("DeadlineExceeded".into())
    );
    assert_eq!(expectation("answered, flagged as cached"), Expect::Success);
    let ids = HashMap::from([("ID", "u1".to_owned())]);
    assert_eq!(
        filled("photos list --user ID --fresh", &ids),
        "photos list --user u1 --fresh"
    );
    assert_eq!(
        uuids("x 00000000-0000-7000-8000-000000000001 y"),
        ["00000000-0000-7000-8000-000000000001"]
    );
}

/// The README's configuration reference lists every setting of `lightbox
/// serve`, each with its variable: a new flag cannot go undocumented.
#[test]
fn the_configuration_reference_lists_every_setting() {
    let readme = include_str!("../README.md");
    let command = <lightbox_app::Cli as clap::CommandFactory>::command();
    let serve = command
        .find_subcommand("serve")
        .unwrap_or_else(|| panic!("no serve subcommand"));
    let mut missing = Vec::new();
    // Hidden flags are test knobs, not settings.
    for arg in serve.get_arguments().filter(|arg| !arg.is_hide_set()) {
        let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        let row = format!("| `--{long}` | `{}` |", env.to_string_lossy());
        if !readme.contains(&row) {
            missing.push(row);
        }
    }
    assert!(
        missing.is_empty(),
        "not in the README's configuration reference: {missing:#?}"
    );
}
