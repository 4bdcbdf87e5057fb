//! The stack's child processes: started with their output in a log file, found by the
//! `listening NAME=URL` line they print, and stopped whatever happens.
//!
//! Each child can run in its own process group ([`Group::Own`], what `openclaw-stack up` uses):
//! Ctrl-C in a terminal then reaches only the stack, which stops its children in order. Under a
//! test runner the children stay in the runner's group ([`Group::Inherit`]) so that its timeout
//! kill reaches them too. Signals go only to a child's own positive pid, never to a group (none
//! of the children starts processes of its own). Either way a [`Proc`] kills its process when
//! dropped, also on panic.
//!
//! What no code can do: if the stack itself is SIGKILLed, its children live on (Linux would
//! need `PR_SET_PDEATHSIG` in the child, i.e. unsafe `pre_exec`, which the workspace forbids).
//! `openclaw-stack up` prints their process ids so they can be found.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::sync::mpsc;

use crate::{Error, Result};

/// Which process group a child runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// A new group led by the child (a terminal's Ctrl-C does not reach it).
    Own,
    /// The parent's group (test runners kill it as a whole on timeout).
    Inherit,
}

/// One line of a child's output.
#[derive(Debug, Clone)]
pub struct Line {
    pub stderr: bool,
    pub text: String,
}

/// A running child process, killed on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    lines: mpsc::UnboundedReceiver<Line>,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr written, line by line, to a new `log_dir/NAME.log`.
    pub fn spawn(name: &str, cmd: Command, log_dir: &Path, group: Group) -> Result<Proc> {
        Proc::start(name, cmd, log_dir, group, false)
    }

    /// [`Proc::spawn`], appending to the log if there is one (a restarted process).
    pub fn spawn_appending(name: &str, cmd: Command, log_dir: &Path, group: Group) -> Result<Proc> {
        Proc::start(name, cmd, log_dir, group, true)
    }

    fn start(
        name: &str,
        mut cmd: Command,
        log_dir: &Path,
        group: Group,
        append: bool,
    ) -> Result<Proc> {
        std::fs::create_dir_all(log_dir).map_err(|e| Error::io(log_dir, e))?;
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log)
            .map_err(|e| Error::io(&log, e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if group == Group::Own {
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|e| Error::Start {
            name: name.to_owned(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source: e,
        })?;
        let file = Arc::new(Mutex::new(file));
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            tee(out, false, file.clone(), tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            tee(err, true, file, tx);
        }
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
            lines,
            exit: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id (0 once reaped).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => {
                self.exit = Some(status);
                self.child = None;
                true
            }
            Some(Ok(None)) => false,
            Some(Err(_)) | None => true,
        }
    }

    /// How it exited, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Waits until `found` accepts a line of output, up to `deadline`. Fails if the process
    /// exits or closes its output first, with the tail of its log.
    pub async fn wait_for_line<T>(
        &mut self,
        deadline: Duration,
        what: &str,
        mut found: impl FnMut(&Line) -> Option<T>,
    ) -> Result<T> {
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(Duration::from_millis(200)), self.lines.recv())
                .await
            {
                Ok(Some(line)) => {
                    if let Some(v) = found(&line) {
                        return Ok(v);
                    }
                }
                Ok(None) => {
                    // Output closed: the process is exiting. Give it a moment to be reaped.
                    return Err(self.failure(&format!("closed its output before {what}")));
                }
                Err(_) => {
                    if self.has_exited() {
                        return Err(self.failure(&format!("exited before {what}")));
                    }
                    if Instant::now() >= until {
                        return Err(
                            self.failure(&format!("did not print {what} within {deadline:?}"))
                        );
                    }
                }
            }
        }
    }

    /// Waits for `listening NAME=URL` lines until every name in `names` has one; returns them.
    pub async fn wait_listening(
        &mut self,
        names: &[&str],
        deadline: Duration,
    ) -> Result<Vec<(String, String)>> {
        let mut seen: Vec<(String, String)> = Vec::new();
        let wanted = names.join(", ");
        self.wait_for_line(
            deadline,
            &format!("`listening` lines for {wanted}"),
            |line| {
                if !line.stderr
                    && let Some(pair) = parse_listening(&line.text)
                {
                    seen.push(pair);
                }
                names
                    .iter()
                    .all(|n| seen.iter().any(|(s, _)| s == n))
                    .then(|| seen.clone())
            },
        )
        .await
    }

    fn failure(&mut self, what: &str) -> Error {
        let status = if self.has_exited() {
            self.exit
                .map_or_else(|| "exited".to_owned(), |s| format!("exited with {s}"))
        } else {
            "still running".to_owned()
        };
        Error::Child {
            name: self.name.clone(),
            what: format!("{what} ({status})"),
            log_tail: self.log_tail(30),
            log: self.log.clone(),
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `listening NAME=URL` pairs printed since the last call, without waiting: for a caller
    /// that polls several starting children in one loop.
    pub fn take_listening(&mut self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            if !line.stderr
                && let Some(pair) = parse_listening(&line.text)
            {
                pairs.push(pair);
            }
        }
        pairs
    }

    /// Signals only ever go to the child itself, by its positive process id, never to a
    /// process group: none of the processes the stack starts starts children of its own.
    fn signal(&self, signal: Signal) {
        let Some(child) = &self.child else { return };
        let Some(pid) = Pid::from_raw(child.id() as i32) else {
            return;
        };
        let _ = rustix::process::kill_process(pid, signal);
    }

    /// SIGKILL now (the whole group if it has its own) and reap. Returns at once if already gone.
    pub fn kill(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(Signal::KILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.exit = child.wait().ok();
        }
    }

    /// Sends SIGTERM; if the process has not exited within `grace`, kills it. Returns how it
    /// ended if it exited by itself.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.has_exited() {
            return self.exit;
        }
        self.signal(Signal::TERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if self.has_exited() {
                return self.exit;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        None
    }

    /// Sends SIGTERM without waiting (see [`Proc::terminate`] to wait).
    pub fn request_stop(&mut self) {
        if !self.has_exited() {
            self.signal(Signal::TERM);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a child's output to the log, line by line, and to the channel while anyone listens.
fn tee(
    stream: impl std::io::Read + Send + 'static,
    stderr: bool,
    log: Arc<Mutex<File>>,
    tx: mpsc::UnboundedSender<Line>,
) {
    std::thread::spawn(move || {
        for text in BufReader::new(stream).lines() {
            let Ok(text) = text else { break };
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "{text}");
            }
            // Keep draining when nobody listens any more, so the child never blocks on a pipe.
            let _ = tx.send(Line { stderr, text });
        }
    });
}

/// `listening api=http://127.0.0.1:1234` -> `("api", "http://127.0.0.1:1234")`.
pub fn parse_listening(line: &str) -> Option<(String, String)> {
    let rest = line.trim().strip_prefix("listening ")?;
    let (name, url) = rest.split_once('=')?;
    (!name.is_empty() && url.contains("://")).then(|| (name.to_owned(), url.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_parse_and_other_lines_do_not() {
        assert_eq!(
            parse_listening("listening peer=http://127.0.0.1:9"),
            Some(("peer".into(), "http://127.0.0.1:9".into()))
        );
        assert_eq!(parse_listening("listening soon"), None);
        assert_eq!(parse_listening("ready"), None);
    }

    #[tokio::test]
    async fn a_child_in_its_own_group_is_found_by_its_line_and_killed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        // `exec`: the process the stack started is the one that lives, and no other.
        cmd.args([
            "-c",
            "echo 'listening api=http://127.0.0.1:1'; exec sleep 30",
        ]);
        let mut p = Proc::spawn("sh", cmd, dir.path(), Group::Own).unwrap();
        let pairs = p
            .wait_listening(&["api"], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(pairs[0].1, "http://127.0.0.1:1");
        let pid = p.id();
        drop(p);
        // Killed by its own pid and reaped.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "process {pid} survived: {stat}");
    }

    #[tokio::test]
    async fn a_child_that_exits_before_listening_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'bad config' >&2; exit 64"]);
        let mut p = Proc::spawn("bad", cmd, dir.path(), Group::Inherit).unwrap();
        let err = p
            .wait_listening(&["api"], Duration::from_secs(10))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad config"), "{err}");
    }
}
