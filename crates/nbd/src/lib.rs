//! A small NBD server for one file, with a gate.
//!
//! Early-start synthesis lets a VM run before its launch disk has arrived:
//! QEMU reads and writes the disk through this server, and the server holds
//! back each request until its owner's [`Gate`] says the range is final (the
//! overlay segments it needs have been applied). Once the whole disk is
//! complete, QEMU switches to the file itself and the server is stopped.
//!
//! One thread accepts connections on a Unix socket; one thread per
//! connection reads requests; a request whose range is ready is served at
//! once, one that must wait gets its own thread, so that a slow range never
//! holds back the others (QEMU keeps up to 16 requests in flight). Replies
//! are simple replies, written whole under a lock, in any order.

pub mod proto;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::*;

/// Decides when a range of the export may be read or written.
pub trait Gate: Send + Sync + 'static {
    /// Whether `[offset, offset + len)` is final now (no waiting).
    fn is_ready(&self, offset: u64, len: u64) -> bool;
    /// Blocks until `[offset, offset + len)` is final. An error fails the
    /// request with EIO (the range will never be served).
    fn wait_ready(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A gate that is always open: a plain NBD server.
pub struct Open;

impl Gate for Open {
    fn is_ready(&self, _: u64, _: u64) -> bool {
        true
    }
    fn wait_ready(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// What one server exports.
pub struct Export {
    /// The export's name, which clients must ask for.
    pub name: String,
    /// Opened read-write at the first request whose range is ready (the
    /// file may be created after the server starts, before the gate opens).
    pub path: PathBuf,
    /// The size announced to clients.
    pub size: u64,
    pub gate: Arc<dyn Gate>,
}

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Requests that had to wait for their range.
    pub waited: AtomicU64,
    pub errors: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartServerError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
}

/// A running server; [`Server::stop`] (or drop) ends it. Neither blocks:
/// the server's threads end on their own once their sockets are shut down.
pub struct Server {
    path: PathBuf,
    shared: Arc<Shared>,
    /// The listening socket (a clone), to shut down: that wakes the accept
    /// thread even when the socket file is gone already.
    listener: Option<UnixListener>,
}

struct Shared {
    export: Export,
    file: std::sync::OnceLock<File>,
    stop: AtomicBool,
    conns: Mutex<Vec<UnixStream>>,
    stats: Stats,
}

impl Server {
    /// Listens on the Unix socket `path` (replacing a stale socket file).
    pub fn start(path: &Path, export: Export) -> Result<Server, StartServerError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| StartServerError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        let shared = Arc::new(Shared {
            export,
            file: std::sync::OnceLock::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            stats: Stats::default(),
        });
        let wake = listener
            .try_clone()
            .map_err(|source| StartServerError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|source| StartServerError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Server {
            path: path.to_path_buf(),
            shared,
            listener: Some(wake),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Closes the listener and every connection, and removes the socket.
    /// Requests still waiting for their range end without a reply.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        // Wakes the accept thread: its accept() fails (Linux).
        // SAFETY: shutdown(2) on a socket we own.
        unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        drop(listener);
        if let Ok(conns) = self.shared.conns.lock() {
            for c in conns.iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn file(&self) -> io::Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.export.path)?;
        // Another thread may have won the race: either file is the same.
        let _ = self.file.set(f);
        Ok(self.file.get().expect("set above"))
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "nbd: accept failed; the server stops");
                break;
            }
        };
        if let Ok(c) = conn.try_clone() {
            if let Ok(mut conns) = shared.conns.lock() {
                conns.push(c);
            }
        }
        let s = shared.clone();
        let _ = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let end = conn.try_clone();
                if let Err(e) = serve_connection(conn, &s) {
                    if !s.stop.load(Ordering::Acquire) {
                        tracing::debug!(error = %e, "nbd: connection ended");
                    }
                }
                // The accept loop keeps a clone: close the socket for real.
                if let Ok(c) = end {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            });
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn serve_connection(mut conn: UnixStream, shared: &Arc<Shared>) -> io::Result<()> {
    if !handshake(&mut conn, &shared.export)? {
        return Ok(());
    }
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    let mut header = [0u8; Request::LEN];
    loop {
        match conn.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = Request::parse(&header).ok_or_else(|| invalid("bad request magic"))?;
        if req.length > MAX_REQUEST {
            return Err(invalid("request larger than announced"));
        }
        let mut data = Vec::new();
        if req.kind == CMD_WRITE {
            data.resize(req.length as usize, 0);
            conn.read_exact(&mut data)?;
        }
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_READ | CMD_WRITE | CMD_FLUSH => {}
            _ => {
                reply(&writer, shared, &req, Err(ENOTSUP), &[])?;
                continue;
            }
        }
        let in_bounds = matches!(req.offset.checked_add(req.length as u64),
            Some(end) if end <= shared.export.size);
        if req.kind != CMD_FLUSH && !in_bounds {
            reply(&writer, shared, &req, Err(EINVAL), &[])?;
            continue;
        }
        let gate = &shared.export.gate;
        if req.kind == CMD_FLUSH || gate.is_ready(req.offset, req.length as u64) {
            execute(&writer, shared, req, data)?;
        } else {
            shared.stats.waited.fetch_add(1, Ordering::Relaxed);
            let (w, s) = (writer.clone(), shared.clone());
            std::thread::Builder::new()
                .name("nbd-wait".into())
                .spawn(move || {
                    let r = match s.export.gate.wait_ready(req.offset, req.length as u64) {
                        Ok(()) => execute(&w, &s, req, data),
                        Err(e) => {
                            tracing::warn!(error = %e, offset = req.offset, "nbd: range never became ready");
                            reply(&w, &s, &req, Err(EIO), &[])
                        }
                    };
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "nbd: reply failed");
                    }
                })?;
        }
    }
}

/// Serves one request whose range is ready, and replies.
fn execute(
    writer: &Mutex<UnixStream>,
    shared: &Shared,
    req: Request,
    data: Vec<u8>,
) -> io::Result<()> {
    let file = match shared.file() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, path = %shared.export.path.display(), "nbd: cannot open the export");
            return reply(writer, shared, &req, Err(EIO), &[]);
        }
    };
    match req.kind {
        CMD_READ => {
            let mut buf = vec![0u8; req.length as usize];
            match file.read_exact_at(&mut buf, req.offset) {
                Ok(()) => {
                    shared.stats.reads.fetch_add(1, Ordering::Relaxed);
                    reply(writer, shared, &req, Ok(()), &buf)
                }
                Err(_) => reply(writer, shared, &req, Err(EIO), &[]),
            }
        }
        CMD_WRITE => {
            let mut r = file.write_all_at(&data, req.offset);
            if r.is_ok() && req.flags & CMD_FLAG_FUA != 0 {
                r = file.sync_data();
            }
            shared.stats.writes.fetch_add(1, Ordering::Relaxed);
            reply(writer, shared, &req, r.map_err(|_| EIO), &[])
        }
        CMD_FLUSH => {
            let r = file.sync_data().map_err(|_| EIO);
            reply(writer, shared, &req, r, &[])
        }
        _ => reply(writer, shared, &req, Err(ENOTSUP), &[]),
    }
}

fn reply(
    writer: &Mutex<UnixStream>,
    shared: &Shared,
    req: &Request,
    result: Result<(), u32>,
    data: &[u8],
) -> io::Result<()> {
    let error = result.err().unwrap_or(0);
    if error != 0 {
        shared.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    if shared.stop.load(Ordering::Acquire) {
        return Err(io::Error::other("server stopped"));
    }
    let mut w = writer
        .lock()
        .map_err(|_| io::Error::other("writer poisoned"))?;
    w.write_all(&simple_reply(error, req.cookie))?;
    if error == 0 && req.kind == CMD_READ {
        w.write_all(data)?;
    }
    Ok(())
}

/// The fixed newstyle handshake. Returns whether transmission starts.
fn handshake(conn: &mut UnixStream, export: &Export) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client_flags = read_u32(conn)?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(invalid("client does not speak fixed newstyle"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    loop {
        let mut h = [0u8; 16];
        conn.read_exact(&mut h)?;
        if u64::from_be_bytes(h[0..8].try_into().unwrap()) != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if len > 64 << 10 {
            return Err(invalid("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if data != export.name.as_bytes() {
                    return Ok(false);
                }
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&b)?;
                return Ok(true);
            }
            OPT_ABORT => {
                conn.write_all(&option_reply(option, REP_ACK, &[]))?;
                return Ok(false);
            }
            OPT_LIST => {
                let mut d = (export.name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.name.as_bytes());
                conn.write_all(&option_reply(option, REP_SERVER, &d))?;
                conn.write_all(&option_reply(option, REP_ACK, &[]))?;
            }
            OPT_INFO | OPT_GO => {
                // u32 name length, name, u16 count, u16 info requests.
                let name = (data.len() >= 4)
                    .then(|| u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize)
                    .and_then(|n| data.get(4..4 + n));
                let Some(name) = name else {
                    conn.write_all(&option_reply(option, REP_ERR_INVALID, &[]))?;
                    continue;
                };
                // An empty name means the default export.
                if !name.is_empty() && name != export.name.as_bytes() {
                    conn.write_all(&option_reply(option, REP_ERR_UNKNOWN, &[]))?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&tflags.to_be_bytes());
                conn.write_all(&option_reply(option, REP_INFO, &info))?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                conn.write_all(&option_reply(option, REP_INFO, &bs))?;
                conn.write_all(&option_reply(option, REP_ACK, &[]))?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            _ => conn.write_all(&option_reply(option, REP_ERR_UNSUP, &[]))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_server(path: &Path, dir: &Path) -> Server {
        let export = Export {
            name: "d".into(),
            path: dir.join("disk"),
            size: 4096,
            gate: Arc::new(Open),
        };
        Server::start(path, export).unwrap()
    }

    #[test]
    fn a_bad_client_flag_ends_the_connection_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let server = small_server(&path, dir.path());
        let mut c = UnixStream::connect(&path).unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        c.write_all(&0u32.to_be_bytes()).unwrap();
        let mut rest = Vec::new();
        // The server closes: no fixed newstyle.
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        server.stop();
        assert!(!path.exists());
    }

    #[test]
    fn stopping_does_not_block_when_the_socket_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let server = small_server(&path, dir.path());
        let shared = server.shared.clone();
        // Its directory removed under it (a deleted VM).
        std::fs::remove_file(&path).unwrap();
        let t = std::time::Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(server);
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(2))
            .expect("dropping the server blocked");
        // The accept thread ends and lets go of the export.
        while Arc::strong_count(&shared) > 1 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "accept thread still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
