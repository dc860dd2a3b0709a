//! A real browser for tests of web pages: headless Chromium (Debian's
//! `chromium`) driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: commands in on fd 3, answers and events out
//! on fd 4, one JSON message each, ended by a NUL byte), so that no
//! WebSocket client is needed. One page per [`Browser`]: [`Browser::open`]
//! it, read what it renders with [`Browser::eval`], keep what it shows with
//! [`Browser::screenshot`].

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the browser may take to answer its first command: a first
/// start on a fresh machine reads ~300 MB of program from a cold disk
/// (20 s seen on an idle machine), slower still beside busy guests.
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Browser {
    child: Child,
    commands: File,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    /// The page's session (`Target.attachToTarget`, flat mode).
    session: Option<String>,
    /// Its profile, and its log (`chromium.log`).
    profile: tempfile::TempDir,
}

/// The Chromium program: `$CLOUDLET_CHROMIUM`, else Debian's `chromium`.
pub fn chromium() -> PathBuf {
    std::env::var_os("CLOUDLET_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("chromium"))
}

fn pipe() -> std::io::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two fds we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

impl Browser {
    /// A headless Chromium with a fresh profile, `width` x `height`.
    pub fn launch(width: u32, height: u32) -> Result<Browser, String> {
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (cmd_read, cmd_write) = pipe().map_err(|e| e.to_string())?;
        let (out_read, out_write) = pipe().map_err(|e| e.to_string())?;
        let log = File::create(profile.path().join("chromium.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(chromium());
        cmd.args([
            "--headless=new",
            // Tests run as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-pipe",
            "--hide-scrollbars",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Out of the way of 3 and 4 first (either may be one of
                // them), then onto them (dup2's copies are not close-on-exec).
                let (a, b) = (
                    libc::fcntl(cmd_read, libc::F_DUPFD, 10),
                    libc::fcntl(out_write, libc::F_DUPFD, 10),
                );
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e} (apt-get install chromium)", chromium().display()))?;
        // SAFETY: the fds are ours; the child's copies are its own.
        let (commands, out) = unsafe {
            libc::close(cmd_read);
            libc::close(out_write);
            (File::from_raw_fd(cmd_write), File::from_raw_fd(out_read))
        };
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            loop {
                let mut msg = Vec::new();
                match r.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                msg.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&msg) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: None,
            profile,
        };
        b.call_within("Browser.getVersion", json!({}), false, START_TIMEOUT)?;
        Ok(b)
    }

    /// Why the browser does not answer: whether it still runs, and the
    /// end of what it printed.
    fn trouble(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("chromium exited ({status})"),
            _ => "chromium still runs".to_string(),
        };
        let log =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{state}; its last lines:\n{}", tail.join("\n"))
    }

    /// Send `method` (to the page once one is open) and wait for its answer.
    fn call(&mut self, method: &str, params: Value, to_page: bool) -> Result<Value, String> {
        self.call_within(method, params, to_page, COMMAND_TIMEOUT)
    }

    fn call_within(
        &mut self,
        method: &str,
        params: Value,
        to_page: bool,
        limit: Duration,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if to_page {
            let s = self.session.clone().ok_or("no page open")?;
            msg["sessionId"] = Value::String(s);
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        bytes.push(0);
        if let Err(e) = self.commands.write_all(&bytes) {
            return Err(format!(
                "{method}: the browser is gone: {e}; {}",
                self.trouble()
            ));
        }
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = match self.answers.recv_timeout(left) {
                Ok(v) => v,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{method}: no answer in {limit:?}; {}",
                        self.trouble()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{method}: the browser closed its pipe; {}",
                        self.trouble()
                    ))
                }
            };
            if v["id"].as_u64() != Some(id) {
                continue; // an event, or another command's late answer
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{method}: {e}"));
            }
            return Ok(v["result"].clone());
        }
    }

    /// Open `url` in a new page (the one the other calls act on).
    pub fn open(&mut self, url: &str) -> Result<(), String> {
        let t = self.call("Target.createTarget", json!({ "url": url }), false)?;
        let target = t["targetId"].as_str().ok_or("no target id")?.to_string();
        let a = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
            false,
        )?;
        self.session = Some(a["sessionId"].as_str().ok_or("no session id")?.to_string());
        Ok(())
    }

    /// The value of JavaScript `expression` in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            true,
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expression}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Wait until `expression` is truthy in the page (checked every 50 ms);
    /// its last value either way.
    pub fn wait_for(&mut self, expression: &str, limit: Duration) -> Result<Value, String> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let v = self.eval(expression)?;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Ok(v);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{expression} still {v} after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PNG of the page as it shows now, the whole page.
    pub fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let r = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
            true,
        )?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().ok_or("no image")?)
            .map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
