//! Finding and reading the virtio-serial port.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use cloudlet_agent_proto::PORT_NAME;

/// Block until the agent's port shows up in sysfs; return its device node.
pub fn wait_for_port() -> PathBuf {
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    let dev = PathBuf::from("/dev").join(e.file_name());
                    if dev.exists() {
                        return dev;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads from the port, waiting (instead of returning EOF) while no host is
/// connected: a virtio console port reads 0 and polls HUP in that state.
pub struct HostReader {
    file: File,
}

impl HostReader {
    pub fn new(file: File) -> Self {
        Self { file }
    }
}

impl Read for HostReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 && pfd.revents & libc::POLLIN != 0 {
                match self.file.read(buf) {
                    Ok(0) => {}
                    other => return other,
                }
            }
            // Host not connected (POLLHUP) or nothing yet: wait a little.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
