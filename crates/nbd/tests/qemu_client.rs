//! The server against QEMU's own NBD client (`qemu-io`, from qemu-utils).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cloudlet_nbd::{Export, Gate, Open, Server};

/// Holds back one range until released (or failed).
struct Held {
    start: u64,
    end: u64,
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Held {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.end && offset + len > self.start
    }
    fn set(&self, ok: bool) {
        *self.state.lock().unwrap() = Some(ok);
        self.cv.notify_all();
    }
}

impl Gate for Held {
    fn is_ready(&self, offset: u64, len: u64) -> bool {
        !self.overlaps(offset, len) || *self.state.lock().unwrap() == Some(true)
    }
    fn wait_ready(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.overlaps(offset, len) {
            return Ok(());
        }
        let mut s = self.state.lock().unwrap();
        loop {
            match *s {
                Some(true) => return Ok(()),
                Some(false) => return Err(io::Error::other("range failed")),
                None => s = self.cv.wait(s).unwrap(),
            }
        }
    }
}

fn qemu_io(socket: &Path, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.arg("-f")
        .arg("raw")
        .arg(format!("nbd+unix:///disk?socket={}", socket.display()));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn ok(out: &Output) -> bool {
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed:")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const MIB: u64 = 1 << 20;

fn held(start: u64, end: u64) -> Arc<Held> {
    Arc::new(Held {
        start,
        end,
        state: Mutex::new(None),
        cv: Condvar::new(),
    })
}

/// A server for `dir/disk.raw` (1 MiB) on `dir/nbd.sock`.
fn serve(dir: &Path, gate: Arc<dyn Gate>) -> (Server, std::path::PathBuf) {
    let sock = dir.join("nbd.sock");
    let server = Server::start(
        &sock,
        Export {
            name: "disk".into(),
            path: dir.join("disk.raw"),
            size: MIB,
            gate,
        },
    )
    .unwrap();
    (server, sock)
}

fn disk(dir: &Path) -> std::fs::File {
    let path = dir.join("disk.raw");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(MIB).unwrap();
    f.write_all_at(&vec![0xab; 64 << 10], 0).unwrap();
    f
}

#[test]
fn qemu_reads_and_writes_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path());
    let (server, sock) = serve(dir.path(), Arc::new(Open));
    let out = qemu_io(
        &sock,
        &[
            "read -P 0xab 0 64k",
            "read -P 0 64k 960k",
            "write -P 0x5a 128k 8k",
            "flush",
            "read -P 0x5a 128k 8k",
        ],
    )
    .output()
    .unwrap();
    assert!(ok(&out), "{}", show(&out));
    let mut b = vec![0u8; 8192];
    file.read_exact_at(&mut b, 128 << 10).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    // A wrong pattern is reported: the check above can fail.
    let out = qemu_io(&sock, &["read -P 0x11 0 4k"]).output().unwrap();
    assert!(!ok(&out), "{}", show(&out));
    assert!(
        server
            .stats()
            .reads
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    server.stop();
    assert!(!sock.exists());
}

#[test]
fn requests_on_a_held_range_wait_and_the_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = disk(dir.path());
    let held = held(256 << 10, 512 << 10);
    let (server, sock) = serve(dir.path(), held.clone());
    // Outside the held range: served at once.
    let t = Instant::now();
    let out = qemu_io(&sock, &["read -P 0xab 0 64k", "write -P 1 64k 4k"])
        .output()
        .unwrap();
    assert!(ok(&out), "{}", show(&out));
    assert!(t.elapsed() < Duration::from_secs(10));

    // Inside: the client waits until the range is released, then its write
    // lands and reads back.
    let mut child = qemu_io(&sock, &["write -P 0x77 300k 4k", "read -P 0x77 300k 4k"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a held write completed"
    );
    let mut b = [0u8; 4096];
    file.read_exact_at(&mut b, 300 << 10).unwrap();
    assert!(b.iter().all(|&x| x == 0), "a held write reached the file");
    held.set(true);
    let out = child.wait_with_output().unwrap();
    assert!(ok(&out), "{}", show(&out));
    file.read_exact_at(&mut b, 300 << 10).unwrap();
    assert!(b.iter().all(|&x| x == 0x77));
    assert!(
        server
            .stats()
            .waited
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    server.stop();
}

#[test]
fn a_range_that_fails_gives_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let _file = disk(dir.path());
    let held = held(0, 4096);
    let (server, sock) = serve(dir.path(), held.clone());
    let child = qemu_io(&sock, &["read 0 4k"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    held.set(false);
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{}", show(&out));
    // Past the end: refused.
    let out = qemu_io(&sock, &["read 2M 4k"]).output().unwrap();
    assert!(!ok(&out), "{}", show(&out));
    // An unknown export name is refused.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(format!("nbd+unix:///nope?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    server.stop();
}
