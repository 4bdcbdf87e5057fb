//! The `openclaw-load` binary: its checks on input, its JSON summary, and Ctrl-C. The load
//! runs go to the real `openclaw-limiter` binary (build it first: `cargo build -p
//! openclaw-limiter`).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openclaw_e2e::{Service, wait_until};
use openclaw_loadgen::Summary;

const LOAD: &str = env!("CARGO_BIN_EXE_openclaw-load");

fn limiter() -> Service {
    Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0"],
        &[],
        Duration::from_secs(20),
    )
}

/// `openclaw-load` running in the background, killed on drop; its output collected as it comes.
struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(LOAD)
            .args(args)
            .env_remove("OPENCLAW_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start openclaw-load");
        let collect = |mut pipe: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the exit (bounded), then for the pipes to be drained.
    fn wait(&mut self, deadline: Duration) -> (Option<i32>, String, String) {
        let until = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < until,
                "openclaw-load still running after {deadline:?}; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader threads finish once the pipes close; poll until the output stops growing.
        let mut last = usize::MAX;
        wait_until(Duration::from_secs(5), "the output to be read", || {
            let len = self.stdout.lock().unwrap().len() + self.stderr.lock().unwrap().len();
            let settled = len == last;
            last = len;
            settled.then_some(())
        });
        (
            status.code(),
            self.stdout.lock().unwrap().clone(),
            self.stderr.lock().unwrap().clone(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bad_input_lists_every_problem_and_exits_64() {
    let (code, stdout, stderr) = Running::start(&[
        "--target",
        "http://10.0.0.1:8080,http://127.0.0.1:1",
        "--rate",
        "ramp:100/10s",
        "--keys",
        "hot:0",
        "--spread",
        "one:7",
        "--duration",
        "soon",
        "--max-requests",
        "-3",
        "--policy",
        "no spaces",
        "--threads",
        "0",
    ])
    .wait(Duration::from_secs(10));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    for expected in [
        "target `http://10.0.0.1:8080`: host `10.0.0.1` is not loopback",
        "--rate: rate profile `ramp:100/10s`",
        "--keys: keys `hot:0`",
        "--duration `soon`",
        "--max-requests `-3`",
        "spread one:7",
        "policy `no spaces`",
        "--threads `0`: expected a whole number from 1 to 1024",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let (code, _, stderr) =
        Running::start(&["--rate", "100", "--connections", "2"]).wait(Duration::from_secs(10));
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--target: give at least one"), "{stderr}");
    assert!(stderr.contains("exclude each other"), "{stderr}");

    let (code, _, stderr) = Running::start(&[
        "--target",
        "http://127.0.0.1:1",
        "--rls-domain",
        "edge",
        "--rls-descriptor",
        "client_id=",
        "--rate",
        "10",
        "--streams",
        "4",
        "--policy",
        "p",
    ])
    .wait(Duration::from_secs(10));
    assert_eq!(code, Some(64));
    for expected in [
        "`client_id=` has no value",
        "--streams is for the closed loop",
        "a policy is for /rate only",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("at least one descriptor"), "{stderr}");

    let (code, _, stderr) = Running::start(&[
        "--target",
        "http://127.0.0.1:1",
        "--connections",
        "2",
        "--streams",
        "4",
        "--rls-descriptor",
        "a=b",
    ])
    .wait(Duration::from_secs(10));
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("--rls-descriptor needs --rls-domain"),
        "{stderr}"
    );
    assert!(stderr.contains("--streams is for RLS calls"), "{stderr}");

    let (code, _, _) = Running::start(&["--no-such-flag"]).wait(Duration::from_secs(10));
    assert_eq!(code, Some(64));
}

#[test]
fn rls_calls_go_over_connections_times_streams_and_count_over_limit_as_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("edge.yaml");
    std::fs::write(
        &rules,
        "domain: edge\ndescriptors:\n  - key: client_id\n    rate_limit: {unit: hour, requests_per_unit: 5}\n",
    )
    .unwrap();
    let service = Service::spawn(
        "openclaw-limiter",
        &["--listen", "127.0.0.1:0"],
        &[
            ("OPENCLAW_RLS_CONFIG", rules.to_str().unwrap()),
            ("OPENCLAW_GRPC_LISTEN", "127.0.0.1:0"),
        ],
        Duration::from_secs(20),
    );
    let grpc = service.url_of("grpc").expect("a `listening grpc=` line");
    // On one thread (Tokio's single-threaded runtime) and on two: each client its own 5.
    for (client, threads, said) in [("one", "1", "1 thread"), ("two", "2", "2 threads")] {
        let descriptor = format!("client_id={client}");
        let (code, stdout, stderr) = Running::start(&[
            "--target",
            grpc,
            "--rls-domain",
            "edge",
            "--rls-descriptor",
            &descriptor,
            "--connections",
            "2",
            "--streams",
            "3",
            "--max-requests",
            "12",
            "--threads",
            threads,
            "--json",
        ])
        .wait(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stderr
                .contains("ShouldRateLimit (domain edge), closed loop, 2 connections x 3 streams"),
            "{stderr}"
        );
        assert!(stderr.contains(said), "{stderr}");
        let summary: Summary = serde_json::from_str(&stdout).expect("stdout is the JSON summary");
        assert_eq!(
            (summary.requests, summary.allowed, summary.rejected),
            (12, 5, 7),
            "{client}: {summary:#?}"
        );
    }
}

#[test]
fn json_prints_the_summary_on_stdout_and_progress_goes_to_stderr() {
    let service = limiter();
    let (code, stdout, stderr) = Running::start(&[
        "--target",
        &service.url,
        "--connections",
        "2",
        "--max-requests",
        "40",
        "--keys",
        "hot:1:1",
        "--json",
    ])
    .wait(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{stderr}");
    let summary: Summary = serde_json::from_str(&stdout).expect("stdout is the JSON summary");
    assert_eq!(
        (summary.requests, summary.allowed),
        (40, 40),
        "{summary:#?}"
    );
    assert_eq!(summary.per_target[0].target, service.url);
    // Not a terminal: plain progress lines, then the table, all on stderr.
    assert!(stderr.contains("sent=40 allowed=40"), "{stderr}");
    assert!(stderr.contains("requests         40"), "{stderr}");
}

#[test]
fn ctrl_c_stops_the_run_early_and_still_prints_the_summary() {
    let service = limiter();
    let mut load = Running::start(&[
        "--target",
        &service.url,
        "--rate",
        "200",
        "--duration",
        "60s",
        // The open loop's scheduler thread spawning onto the single-threaded runtime.
        "--threads",
        "1",
        "--json",
    ]);
    // Wait until it is sending (its first progress line), then interrupt it as Ctrl-C does.
    wait_until(Duration::from_secs(10), "a progress line", || {
        load.stderr.lock().unwrap().contains("t=").then_some(())
    });
    let interrupted = Command::new("kill")
        .args(["-INT", &load.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let (code, stdout, stderr) = load.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");
    let summary: Summary = serde_json::from_str(&stdout).expect("stdout is the JSON summary");
    assert!(summary.cancelled, "{summary:#?}");
    assert!(summary.requests >= 150, "{summary:#?}");
    assert!(summary.elapsed < Duration::from_secs(30), "{summary:#?}");
    assert!(stderr.contains("stopped early"), "{stderr}");
}
