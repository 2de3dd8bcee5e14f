//! A redis-server of the test's own on a free port, which the test may kill and restart.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::PATIENCE;

pub struct Redis {
    args: Vec<String>,
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// A fresh redis-server on a free port.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A fresh redis-server on a free port with `args` added (e.g. `--requirepass`).
    pub async fn start_with(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            args: args.iter().map(|a| a.to_string()).collect(),
            port,
            child: None,
        };
        redis.spawn().await;
        redis
    }

    pub async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.conn().await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The URL a node connects with (with the password when one is required).
    pub fn url(&self) -> String {
        let password = self
            .args
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|at| self.args.get(at + 1));
        match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub async fn conn(&self) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()?;
        Some(conn)
    }

    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut conn = self.conn().await.expect("redis up");
        let reply: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        reply.1
    }

    pub async fn wait_numsub(&self, channel: &str, want: i64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let got = self.numsub(channel).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "NUMSUB {channel} stayed {got}, wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn command(&self, args: &[&str]) -> redis::Value {
        let mut conn = self.conn().await.expect("redis up");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async::<redis::Value>(&mut conn).await.unwrap()
    }

    /// How many times Redis has run `command` (from `INFO commandstats`): unlike NUMSUB, this
    /// sees a repeated SUBSCRIBE on a connection already subscribed.
    pub async fn calls(&self, command: &str) -> u64 {
        let mut conn = self.conn().await.expect("redis up");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        let key = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&key))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
