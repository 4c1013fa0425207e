//! The server binary as a child process (`kill -9` tests): started with arguments, its
//! output captured, its listening address read from its log.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::PATIENCE;

enum ChildEvent {
    Listening(SocketAddr),
    Eof,
}

/// The server binary running as a child process; killed (SIGKILL) when dropped.
pub struct ChildServer {
    child: Child,
    /// Everything it wrote on stdout and stderr.
    pub output: Arc<Mutex<String>>,
    events: mpsc::UnboundedReceiver<ChildEvent>,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes ANSI escape sequences (the log may be coloured).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address of a `listening addr=...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn forward_output(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    events: mpsc::UnboundedSender<ChildEvent>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).into_owned();
            output.lock().unwrap().push_str(&text);
            if let Some(addr) = listening_addr(&text) {
                let _ = events.send(ChildEvent::Listening(addr));
            }
            line.clear();
        }
        let _ = events.send(ChildEvent::Eof);
    });
}

impl ChildServer {
    /// Starts the binary with `args` (stdout and stderr captured).
    pub fn spawn(args: &[&str]) -> ChildServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_optiverse-collab"))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("COLLAB_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, events) = mpsc::unbounded_channel();
        forward_output(child.stdout.take().unwrap(), output.clone(), tx.clone());
        forward_output(child.stderr.take().unwrap(), output.clone(), tx);
        ChildServer {
            child,
            output,
            events,
        }
    }

    /// Starts the binary with `args` on a free loopback port, and returns it once it logged
    /// its address.
    pub async fn start(args: &[&str]) -> (ChildServer, SocketAddr) {
        let mut all = vec!["--host", "127.0.0.1", "--port", "0"];
        all.extend_from_slice(args);
        let mut server = ChildServer::spawn(&all);
        // The first event is the address, or the end of an output stream (it exited).
        let addr = match tokio::time::timeout(PATIENCE, server.events.recv()).await {
            Ok(Some(ChildEvent::Listening(addr))) => Some(addr),
            _ => None,
        };
        let addr = addr.unwrap_or_else(|| {
            panic!(
                "the server never logged `listening addr=`; its output:\n{}",
                server.output.lock().unwrap()
            )
        });
        (server, addr)
    }

    /// Waits until the process closed both output streams (it exited), then its status.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let mut eofs = 0;
        let ended = tokio::time::timeout(PATIENCE, async {
            while eofs < 2 {
                match self.events.recv().await {
                    Some(ChildEvent::Eof) | None => eofs += 1,
                    Some(ChildEvent::Listening(_)) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the server did not exit; its output:\n{}",
            self.output.lock().unwrap()
        );
        self.child.wait().unwrap()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
    }
}
