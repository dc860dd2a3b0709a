//! Real etcd for the directory's fleet tests and benchmark: one member or a
//! cluster of several on localhost, each its own `etcd` process (Debian's
//! `etcd-server`), with data under a directory the caller owns. Members are
//! killed with SIGKILL (a crash, not a shutdown) and can be started again
//! on their data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, request};

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    dir: PathBuf,
    cluster: String,
    child: Option<Child>,
}

pub struct Etcd {
    pub members: Vec<Member>,
}

impl Member {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self, new: bool) {
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.name)))
            .expect("etcd log file");
        let child = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.join(&self.name))
            .args([
                "--listen-client-urls",
                &self.url(),
                "--advertise-client-urls",
                &self.url(),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_port),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_port),
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                if new { "new" } else { "existing" },
                "--initial-cluster-token",
                "cloudlet-test",
                // etcd's defaults, said here: a killed leader is replaced
                // after about one election timeout.
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (install etcd-server: scripts/install-deps.sh)");
        self.child = Some(child);
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on its data (after [`Member::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        self.spawn(false);
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `(its member id, the leader's id)` from the member's status, or
    /// `None` while it does not answer.
    pub fn status(&self) -> Option<(String, String)> {
        let r = request(
            crate::local(self.client_port),
            "POST",
            "/v3/maintenance/status",
            Some(b"{}"),
            Duration::from_secs(2),
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&r.text()).ok()?;
        let me = v["header"]["member_id"].as_str()?.to_string();
        let leader = v["leader"].as_str()?.to_string();
        (leader != "0").then_some((me, leader))
    }
}

impl Etcd {
    /// Start `n` members under `dir` and wait until they have a leader.
    pub fn start(n: usize, dir: &Path) -> Etcd {
        std::fs::create_dir_all(dir).expect("etcd dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| Member {
                name: format!("m{i}"),
                client_port: *c,
                peer_port: *p,
                dir: dir.to_path_buf(),
                cluster: cluster.clone(),
                child: None,
            })
            .collect();
        for m in &mut members {
            m.spawn(true);
        }
        let etcd = Etcd { members };
        etcd.wait_leader(Duration::from_secs(30));
        etcd
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// Wait until every running member agrees on a leader; its index.
    pub fn wait_leader(&self, within: Duration) -> usize {
        let until = Instant::now() + within;
        loop {
            let seen: Vec<Option<(String, String)>> = self
                .members
                .iter()
                .map(|m| m.running().then(|| m.status()).flatten())
                .collect();
            let running = self.members.iter().filter(|m| m.running()).count();
            let answers: Vec<&(String, String)> = seen.iter().flatten().collect();
            if answers.len() == running
                && answers.windows(2).all(|w| w[0].1 == w[1].1)
                && !answers.is_empty()
            {
                let leader = &answers[0].1;
                if let Some(i) = seen
                    .iter()
                    .position(|s| s.as_ref().is_some_and(|(me, _)| me == leader))
                {
                    return i;
                }
            }
            assert!(
                Instant::now() < until,
                "etcd has no leader after {within:?} (logs in {})",
                self.members[0].dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}
